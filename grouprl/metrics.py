"""Where the numbers go: a JSONL file and TensorBoard per step, completions to their own JSONL file."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, out_dir: Path, tensorboard: bool = True):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = (out_dir / "metrics.jsonl").open("a")
        self.completions = (out_dir / "completions.jsonl").open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        for r in rows:
            self.completions.write(json.dumps({"step": step, **r}) + "\n")
        self.completions.flush()

    def close(self) -> None:
        self.metrics.close()
        self.completions.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
