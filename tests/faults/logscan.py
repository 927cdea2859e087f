"""What a worker's log says went wrong: its ERROR and CRITICAL lines, condensed."""

from __future__ import annotations

import re
from collections import Counter

# Celery's format: "[2026-12-01 23:55:00,123: ERROR/MainProcess] message"
_LEVEL = re.compile(r"^\[[^\]]*?: (ERROR|CRITICAL)/[^\]]*\] ?(.*)$")
_WARNING = re.compile(r"^\[[^\]]*?: WARNING/[^\]]*\] ?(.*)$")
_NOISE = ("celery-anyio-faults: ready", "Warning:", "warnings.warn", "_warn_or_raise")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Group|Lost|Disallowed)\b.*)$")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
WIDTH = 160


def _shorten(text: str, width: int = WIDTH) -> str:
    text = text.strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def error_lines(text: str) -> list[str]:
    """Every ERROR/CRITICAL message, in order, cut to one line."""
    return [
        _shorten(m.group(1) + ": " + m.group(2)) for m in map(_LEVEL.match, text.splitlines()) if m
    ]


def first_warning(text: str) -> str | None:
    """The first WARNING message that is not start-up or deprecation noise."""
    for match in map(_WARNING.match, text.splitlines()):
        if match and match.group(1).strip() and not any(n in match.group(1) for n in _NOISE):
            return _shorten("WARNING: " + match.group(1))
    return None


def last_exception(text: str) -> str | None:
    """The last ``SomeError: ...`` line of a traceback in ``text``."""
    found = [m.group(1) for m in map(_EXCEPTION.match, text.splitlines()) if m]
    return _shorten(found[-1]) if found else None


def summary(text: str, limit: int = 3) -> list[str]:
    """The most frequent error messages (task ids blanked), with their counts."""
    counts = Counter(_UUID.sub("<id>", line) for line in error_lines(text))
    return [f"{n}x {line}" if n > 1 else line for line, n in counts.most_common(limit)]


def first_match(text: str, pattern: str) -> str | None:
    found = re.search(pattern, text, re.MULTILINE)
    return _shorten(found.group(0)) if found else None


_THREAD = re.compile(r'^Thread \S+ \((\w+)\): "([^"]*)"')
_IDLE = ("_worker", "Condition.wait", "Event.wait")  # pool threads waiting for work
_PLUMBING = ("Thread.", "_bootstrap", "_worker", "_WorkItem.run", "<module>", "_run_", "main")


def _brief(frames: tuple[str, ...], inner: int = 3, outer: int = 3) -> str:
    callers = [f for f in frames[inner:] if not f.startswith(_PLUMBING)]
    shown = list(frames[:inner]) + (["…"] if len(callers) > outer else []) + callers[-outer:]
    return " < ".join(shown)


def stack_summary(dump: str, limit: int = 3) -> list[str]:
    """The busiest distinct stacks of a py-spy dump (innermost frame first), idle
    pool threads left out: ``"12x ThreadPoolExecutor: _read < … < acknowledge"``."""
    groups: Counter[tuple[str, ...]] = Counter()
    names: dict[tuple[str, ...], str] = {}
    frames: list[str] | None = None
    name = ""

    def flush() -> None:
        if frames and frames[0] not in _IDLE:
            key = tuple(frames)
            groups[key] += 1
            names.setdefault(key, name)

    for line in dump.splitlines():
        thread = _THREAD.match(line)
        if thread:
            flush()
            frames, name = [], re.sub(r"[-_]\d+(_\d+)?$", "", thread.group(2))
        elif frames is not None and line.startswith("    "):
            frames.append(line.strip().split(" (")[0])
    flush()
    return [f"{n}x {names[key]}: {_brief(key)}" for key, n in groups.most_common(limit)]
