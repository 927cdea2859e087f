"""Results of a run: one table per fault (rows: pools), as Markdown and as JSON.

Each row also says which of the project's targets it misses: 0 lost; the worker
alive and draining again within :data:`RECOVER_TARGET` s of the broker's return;
no more tasks run twice than the threads pool in the same fault; for hostile
messages, a clear error for each and the next tasks all succeeding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .pools import BASELINE

RECOVER_TARGET = 10.0


@dataclass
class Row:
    pool: str
    sent: int = 0
    ran: int | None = None
    succeeded: int | None = None
    lost: int | None = None
    twice: int | None = None
    alive: str = "?"
    recover_s: float | None = None
    # Every task had run before the broker came back: there was nothing to recover.
    drained_before_return: bool = False
    notes: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_alive(self) -> bool:
        return self.alive.startswith("yes")


@dataclass
class Detail:
    """One hostile message as one pool's worker took it (the malformed fault)."""

    message: str
    pool: str
    worker: str
    logged: str
    broker: str
    state: str
    clear: bool
    seconds: float = 0.0


@dataclass
class FaultResult:
    name: str
    broker: str
    description: str
    recovery_applies: bool = False
    rows: list[Row] = field(default_factory=list)
    details: list[Detail] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def judge(self) -> None:
        """Fill each row's ``misses`` with the targets it does not meet."""
        baseline = next((r for r in self.rows if r.pool == BASELINE), None)
        for row in self.rows:
            misses = []
            if row.lost is None or row.lost > 0:
                misses.append("lost" if row.lost else "not counted")
            if not row.is_alive:
                misses.append("not alive")
            if (
                self.recovery_applies
                and not row.drained_before_return
                and (row.recover_s is None or row.recover_s > RECOVER_TARGET)
            ):
                misses.append(f"recover>{RECOVER_TARGET:.0f}s")
            if (
                baseline is not None
                and row is not baseline
                and row.twice is not None
                and baseline.twice is not None
                and row.twice > baseline.twice
            ):
                misses.append("twice>threads")
            unclear = [d.message for d in self.details if d.pool == row.pool and not d.clear]
            if unclear:
                misses.append(f"{len(unclear)} unclear")
            if self.details and row.succeeded != row.sent:
                misses.append("next tasks failed")
            row.misses = misses


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _line(cells: tuple[object, ...]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown(result: FaultResult) -> str:
    lines = [f"### {result.name} ({result.broker})", "", result.description, ""]
    if result.error:
        lines += [f"**harness error:** `{_cell(result.error)}`", ""]
    if result.rows:
        lines += [
            "| pool | sent | ran | succeeded | lost | ran twice | alive | recover s | targets | notes |",
            "|---|---:|---:|---:|---:|---:|---|---:|---|---|",
        ]
        for r in result.rows:
            targets = "ok" if not r.misses else "MISS: " + ", ".join(r.misses)
            cells = (r.pool, r.sent, r.ran, r.succeeded, r.lost, r.twice, r.alive, r.recover_s)
            lines.append(_line((*cells, targets, "; ".join(r.notes))))
        lines.append("")
    if result.details:
        lines += [
            "| message | pool | worker | logged | broker | result |",
            "|---|---|---|---|---|---|",
        ]
        for d in result.details:
            lines.append(_line((d.message, d.pool, d.worker, d.logged, d.broker, d.state)))
        lines.append("")
    lines.append(f"_{result.seconds:.0f} s_")
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], results: list[FaultResult]) -> None:
    path.write_text(
        json.dumps({"meta": meta, "faults": [asdict(r) for r in results]}, indent=2) + "\n"
    )
