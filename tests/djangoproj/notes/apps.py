from django.apps import AppConfig


class NotesConfig(AppConfig):
    name = "tests.djangoproj.notes"
    label = "notes"
