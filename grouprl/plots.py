"""Plots of a run's metrics.jsonl (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import yaml

from grouprl.errors import UserError
from grouprl.metrics import read_metrics


def _rows(run_dir: Path) -> list[dict]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise UserError(f"{str(run_dir / 'metrics.jsonl')!r} holds no step yet: nothing to plot")
    bad = next((i for i, r in enumerate(rows) if "reward" not in r), None)  # (read_metrics: a step, numbers)
    if bad is not None:
        raise UserError(f"{str(run_dir / 'metrics.jsonl')!r} row {bad + 1} is not a grouprl metrics row (a step "
                        "and a reward)")
    return rows


def _algo(run_dir: Path) -> str:
    """The run's algorithm as its grouprl.yaml names it ('grpo' when it names none it can be read for)."""
    try:
        algo = yaml.safe_load((run_dir / "grouprl.yaml").read_text()).get("algo")
    except (OSError, ValueError, AttributeError, RecursionError, yaml.YAMLError):
        algo = None
    return algo if algo in ("grpo", "ppo") else "grpo"


def plot_rewards(run_dir: Path, out: Path, window: int = 5, others: list[Path] | None = None) -> Path:
    """Reward per step (thin) with a moving average (thick) and, for runs with eval_every, the held-out
    accuracy on a second axis of the same panel (markers); each reward function's mean beside it. With
    `others`, their curves on the same axes (dashed, dotted, ...), labelled by folder name."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [(run_dir, _rows(run_dir))] + [(d, _rows(d)) for d in others or []]
    with matplotlib.rc_context({"text.parse_math": False}):  # a '$' in a name or path is text, not TeX
        return _draw(run_dir, runs, out, window, others)


def _draw(run_dir: Path, runs: list[tuple[Path, list[dict]]], out: Path, window: int,
          others: list[Path] | None) -> Path:
    """The figure of plot_rewards."""
    import matplotlib.pyplot as plt

    keys = sorted(k for k in runs[0][1][0] if k.startswith("reward/"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    acc_ax = None
    if any("eval/accuracy" in r for _, rows in runs for r in rows):
        acc_ax = ax1.twinx()
        acc_ax.set_ylabel("held-out accuracy (markers)")
        acc_ax.set_ylim(0, 1)

    def smooth(ys: list[float]) -> list[float]:
        return [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]

    for n, (d, rows) in enumerate(runs):
        steps, style = [r["step"] for r in rows], ["-", "--", ":", "-."][n % 4]
        name = f"{d.name}: " if others else ""
        total = [r["reward"] for r in rows]
        ax1.plot(steps, total, alpha=0.3, color=f"C{n}", linestyle=style)
        ax1.plot(steps, smooth(total), color=f"C{n}", linestyle=style, label=f"{name}total reward ({window}-step mean)")
        evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        if acc_ax is not None and evals:
            acc_ax.plot(*zip(*evals), marker="o", color=f"C{n}", linestyle=style, alpha=0.8)
            ax1.plot([], [], marker="o", color=f"C{n}", linestyle=style, label=f"{name}held-out accuracy (right)")
        for i, k in enumerate(keys):
            ax2.plot(steps, smooth([r.get(k, float("nan")) for r in rows]), color=f"C{i + 1}", linestyle=style,
                     label=f"{name}{k.removeprefix('reward/')}" if others else k.removeprefix("reward/"))
    ax1.set_xlabel("step")
    ax1.set_ylabel("reward")
    ax1.legend(fontsize="small")
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"mean per function ({window}-step mean)")
    ax2.legend(fontsize="x-small" if others else "medium")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{_algo(run_dir).upper()}: {run_dir}" + "".join(f" vs {d}" for d in others or []))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
