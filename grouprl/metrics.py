"""Where the numbers go: a JSONL file per step, completions to their own JSONL file, and the trackers.

The JSONL logs are appended a line at a time, so a kill or a full disk can leave a torn last line; readers
skip it (`read_jsonl`) and a resumed run cuts it off (`truncate_jsonl`) before appending again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from grouprl.errors import UserError
from grouprl.guard import write_atomic


class MetricsLog:
    """The logs of a run: metrics.jsonl always (resume, plot and compare read it), completions.jsonl with
    'jsonl' in report_to, and the trackers of report_to (grouprl/trackers.py). Under torchrun only rank 0
    writes (the batch it logs is the whole batch, every rank's completions in it); on the others it is
    `Silent`."""

    def __init__(self, out_dir: Path, report_to: list[str] | tuple[str, ...] = ("jsonl", "tensorboard"),
                 config: dict | None = None, project: str = "grouprl", name: str | None = None):
        from grouprl.trackers import open_trackers

        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = (out_dir / "metrics.jsonl").open("a")
        self.completions = (out_dir / "completions.jsonl").open("a") if "jsonl" in report_to else None
        try:
            self.trackers = open_trackers(list(report_to), out_dir, config or {}, project, name or out_dir.name)
        except BaseException:
            self._close_files()
            raise

    @staticmethod
    def _append(f, lines: list[str]) -> None:
        try:
            f.writelines(lines)
            f.flush()
        except OSError as e:  # a full disk: the torn line this may leave is cut off on resume
            raise UserError(f"cannot write {f.name!r}: {e.strerror or e}; the checkpoints are intact (free some "
                            "space and resume)") from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._append(self.metrics, [json.dumps({"step": step, **metrics}) + "\n"])
        for t in self.trackers:
            t.log(step, metrics)

    def log_completions(self, step: int, rows: list[dict], group_size: int) -> None:
        """rows: one per sequence, G in a row per prompt: to completions.jsonl as they are, to the trackers as
        a table with one row per prompt (trackers.completions_table)."""
        if self.completions is not None:
            self._append(self.completions, [json.dumps({"step": step, **r}) + "\n" for r in rows])
        if self.trackers:
            from grouprl.trackers import completions_table

            columns, table = completions_table(step, rows, group_size)
            for t in self.trackers:
                t.table(step, columns, table)

    def sync(self) -> None:
        """Flush the log files to disk (before a checkpoint commits, so the logs are never behind it)."""
        for f in (self.metrics, self.completions):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())

    def _close_files(self) -> None:
        self.metrics.close()
        if self.completions is not None:
            self.completions.close()

    def close(self) -> None:
        self._close_files()
        for t in self.trackers:
            t.close()


class Silent(MetricsLog):
    """The log of a rank other than 0: writes nothing."""

    def __init__(self):
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_completions(self, step: int, rows: list[dict], group_size: int) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of every row of a JSONL log. A torn last line (a write cut short) is left out; a broken
    line anywhere else is damage the user should see: UserError naming the line."""
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror}") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            if i == len(lines) - 1:
                break  # torn last line
            raise UserError(f"{str(path)!r} line {i + 1} is not valid JSON: the log is damaged") from None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise UserError(f"{str(path)!r} line {i + 1} is not a grouprl log row (a JSON object with a whole-number "
                            "step): the log is damaged")
        rows.append((line, row))
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL log, a torn last line skipped."""
    return [row for _, row in _rows(path)]


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics log: read_jsonl, and every value a number (NaN and inf as json writes them)."""
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        bad = next((k for k, v in row.items() if not (type(v) is float or type(v) is int and abs(v) < 2**63)), None)
        if bad is not None:
            raise UserError(f"{str(path)!r} row {i + 1}: {bad!r} is not a number: the log is damaged")
    return rows


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of a metrics/completions log up to `last_step` (what a resumed run will write again);
    a torn last line goes too. Rewritten through a temporary file, so a kill here loses nothing."""
    if not path.is_file():
        return
    write_atomic(path, "".join(line + "\n" for line, row in _rows(path) if row["step"] <= last_step))
