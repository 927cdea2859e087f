"""Print the Markdown tables of one ``benchmarks.run`` JSON file.

``python -m benchmarks.render benchmarks/results/full-redis.json``: results,
ratios against Celery's own pools from the same run, backends, and the
``--processes`` scaling table. Figures are medians over the runs, with
``[min-max]`` when there were several; a ratio is one case's median tasks/s
over another's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Case = dict[str, Any]
BASELINES = ("threads -c 500", "2 x threads -c 500", "prefork -c 2", "solo")


def rate(run: dict[str, Any]) -> float:
    return float(run["tasks"] / run["seconds"])


def median_rate(case: Case) -> float:
    return statistics.median(rate(run) for run in case["runs"])


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median [min-max]``, or just the value of a single run."""
    if not values:
        return "—"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" [{fmt.format(min(values))}-{fmt.format(max(values))}]"
    return text


def figure(case: Case, get: Callable[[dict[str, Any]], Any], fmt: str = "{:.2f}") -> str:
    return spread([v for v in map(get, case["runs"]) if v is not None], fmt)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines if len(lines) > 2 else []


class Run:
    """Look-ups over one run's cases."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.meta = document["meta"]
        self.cases: list[Case] = document["cases"]
        self.kombu: list[float] = document["kombu_raw"]
        self.notes: list[str] = document["notes"]

    def find(self, label: str, workload: str) -> Case | None:
        for case in self.cases:
            if case["label"] == label and case["workload"]["name"] == workload and case["runs"]:
                return case
        return None

    def ratio(self, case: Case, label: str) -> str:
        other = self.find(label, case["workload"]["name"])
        return "—" if other is None else f"{median_rate(case) / median_rate(other):.2f}x"


def results(run: Run) -> list[str]:
    header = ["config", "workload", "drain s", "tasks/s", "CPU ms/task", "peak RSS MB"]
    header += ["loop lag p99 ms", "start p50 / p99 ms", "done p50 / p99 ms"]
    rows = []
    for case in run.cases:
        workload = case["workload"]["name"]
        if case["n"] != case["workload"]["n"]:
            workload += f" (n={case['n']})"
        if not case["runs"]:
            error = "; ".join(dict.fromkeys(case["errors"])).replace("|", "/")
            rows.append([case["label"], workload, f"ERROR: {error}", *["—"] * 6])
            continue
        if case["workload"]["hold"]:
            held = min(r["peak_in_flight"] for r in case["runs"])
            workload += f" (peak {held:,} in flight)"
        drain = figure(case, lambda r: r["seconds"])
        if case["errors"]:
            drain += f" ({len(case['errors'])} failed)"
        rows.append(
            [case["label"], workload, drain, figure(case, rate, "{:,.0f}"),
             figure(case, lambda r: r["cpu_ms_per_task"]),
             figure(case, lambda r: r["peak_rss_mb"], "{:.0f}"),
             figure(case, lambda r: r.get("lag_p99_ms"), "{:.1f}"),
             latency(case, "start"), latency(case, "done")]
        )  # fmt: skip
    return table(header, rows)


def latency(case: Case, which: str) -> str:
    lats = [r["latency"] for r in case["runs"] if "latency" in r]
    if not lats:
        return "ERROR" if any("latency_error" in r for r in case["runs"]) else "—"
    p50 = statistics.median(lat[f"{which}_p50"] for lat in lats)
    return f"{p50:.1f} / {spread([lat[f'{which}_p99'] for lat in lats], '{:.1f}')}"


def ratios(run: Run) -> list[str]:
    kombu = statistics.median(run.kombu) if run.kombu else None
    header = ["config", "workload", "tasks/s", *(f"÷ {b}" for b in BASELINES), "÷ kombu raw"]
    rows = []
    for case in run.cases:
        held = case["workload"]["hold"] or case["workload"]["reserve"]
        if not case["runs"] or case["label"] in BASELINES or held:
            continue
        cells = [run.ratio(case, label) for label in BASELINES]
        cells.append(f"{median_rate(case) / kombu:.2f}x" if kombu else "—")
        if any(cell != "—" for cell in cells):
            rows.append(
                [case["label"], case["workload"]["name"], f"{median_rate(case):,.0f}", *cells]
            )
    return table(header, rows)


def backends(run: Run) -> list[str]:
    """trio and uvloop against asyncio, for each celery_anyio config that has all of them."""
    rows = []
    for case in run.cases:
        config = case["config"]
        if config["backend"] != "asyncio" or not case["runs"]:
            continue
        cells = [case["workload"]["name"], case["label"].removeprefix("anyio-asyncio ")]
        cells.append(f"{median_rate(case):,.0f}")
        for other in ("trio", "uvloop"):
            twin = run.find(case["label"].replace("asyncio", other, 1), case["workload"]["name"])
            cells.append("—" if twin is None else run.ratio(twin, case["label"]))
        if cells[-2:] != ["—", "—"]:
            rows.append(cells)
    return table(
        ["workload", "config", "asyncio tasks/s", "trio ÷ asyncio", "uvloop ÷ asyncio"], rows
    )


def scaling(run: Run) -> list[str]:
    """``--processes N`` against one process and N independent workers, and its ceiling.

    The main process does the consumer's work for every task, so it caps the
    worker at 1 / (its CPU per task); the whole worker's CPU per task over the
    main's is the number of cores it takes to get there (the broker's excluded).
    """
    rows = []
    for case in run.cases:
        config = case["config"]
        if config["pool"] != "celery_anyio:Pool" or config["processes"] < 2 or not case["runs"]:
            continue
        workload, processes = case["workload"]["name"], config["processes"]
        one_label = case["label"].replace(f" --processes {processes}", "")
        one = run.find(one_label, workload)
        pair = run.find(f"{processes} x {one_label}", workload)
        cells = [workload, case["label"], f"{median_rate(case):,.0f}"]
        for other in (one, pair):
            cells += (
                ["—", "—"]
                if other is None
                else [f"{median_rate(other):,.0f}", run.ratio(case, other["label"])]
            )
        total = statistics.median(r["cpu_ms_per_task"] for r in case["runs"])
        main = [r["main_cpu_ms_per_task"] for r in case["runs"] if "main_cpu_ms_per_task" in r]
        if main:
            cells += [f"{total:.2f} / {statistics.median(main):.2f}"]
            cells += [
                f"{1000 / statistics.median(main):,.0f} at {total / statistics.median(main):.1f}"
            ]
        else:
            cells += [f"{total:.2f}", "—"]
        cells += [memory(case, one, "peak_rss_mb"), memory(case, one, "peak_pss_mb")]
        rows.append(cells)
    header = ["workload", "config", "tasks/s", "1 process tasks/s", "÷ 1 process"]
    header += ["N workers tasks/s", "÷ N workers", "CPU ms/task: all / main process"]
    header += ["ceiling tasks/s at cores", "peak RSS MB, ÷ 1 process", "peak PSS MB, ÷ 1 process"]
    return table(header, rows)


def memory(case: Case, one: Case | None, key: str) -> str:
    """The largest peak over the runs, and its ratio to the single process's."""
    peak = max(r.get(key, 0.0) for r in case["runs"])
    if one is None or not max(r.get(key, 0.0) for r in one["runs"]):
        return f"{peak:.0f}"
    return f"{peak:.0f} ÷ {max(r[key] for r in one['runs']):.0f} = {peak / max(r[key] for r in one['runs']):.2f}x"


def header(run: Run) -> list[str]:
    meta = run.meta
    machine = meta["machine"]
    found = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    source = f"commit {meta['commit']}"
    if meta["uncommitted"]:
        source += f" + uncommitted changes ({len(meta['uncommitted'])} files)"
    if meta.get("source_digest_end") != meta.get("source_digest_start"):
        source += "; celery_anyio/ CHANGED during the run"
    loads = [r["load_1min"] for case in run.cases for r in case["runs"] if "load_1min" in r]
    load = " / ".join(f"{v:.2f}" for v in meta["load_start"])
    load_end = " / ".join(f"{v:.2f}" for v in meta.get("load_end", ()))
    env = " ".join(f"{k}={v}" for k, v in meta["worker_env"].items())
    minutes = meta.get("wall_minutes", 0)
    return [
        f"- date: {meta['date']}, run id `{meta['run_id']}`, {minutes:.1f} min, {meta['runs']} runs",
        f"- command: `{env + ' ' if env else ''}{meta['command']}`",
        f"- {machine['cpus']} CPUs, {machine['memory_gib']} GiB, Python {machine['python']}; {found}",
        f"- source: {source}",
        f"- load average (1/5/15 min) at start {load}, at end {load_end}"
        + (f"; 1 min, after each run: {spread(loads, '{:.1f}')}" if loads else ""),
        f"- other busy processes: {'; '.join(meta.get('neighbours') or ['none above 20% CPU'])}",
        f"- broker `{meta['broker_url']}`, results `{meta['results_url']}`",
    ]


def render(document: dict[str, Any]) -> str:
    run = Run(document)
    meta = run.meta
    lines = [f"# Benchmarks: {meta['profile']} profile on {meta['broker']}", "", *header(run), ""]
    sections = [
        ("Results", results(run)),
        ("Against Celery's own pools (tasks/s ratios)", ratios(run)),
        ("Backends at the same config (tasks/s ratios)", backends(run)),
        ("Processes", scaling(run)),
    ]
    for title, body in sections:
        if body:
            lines += [f"## {title}", "", *body, ""]
    if run.kombu:
        each = ", ".join(f"{r:,.0f}" for r in run.kombu)
        lines += [f"kombu raw (one consumer, prefetch 100, ack each): {each} msgs/s", ""]
    if run.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in run.notes), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a JSON file written by benchmarks.run")
    args = parser.parse_args(argv)
    print(render(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
