"""The comparison report: the table (markdown and HTML), the reward plots and sample completions, from the
dict that `compare.summarise` builds and the runs' metrics and completions logs."""

from __future__ import annotations

import html
import json
from pathlib import Path

from grouprl.config import TrainConfig
from grouprl.metrics import read_metrics

LAST = 5  # steps averaged for "reward at the end" and "reward at equal time"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def cumulative_time(rows: list[dict]) -> list[float]:
    out, t = [], 0.0
    for r in rows:
        t += r["step_time"]
        out.append(t)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison table: one column per run."""
    runs = report["runs"]
    header = ["", *[r["name"] for r in runs]]
    rows = [
        ["models trained", *[str(r["models_trained"]) for r in runs]],
        ["models held in memory", *[str(r["models_in_memory"]) for r in runs]],
        ["trainable parameters", *[f"{r['trainable_parameters']:,}" for r in runs]],
        ["peak memory (GiB)", *[f"{r['peak_memory_gib']:.2f}" for r in runs]],
        ["median step (s)", *[f"{r['median_step_s']:.1f}" for r in runs]],
        ["- generation (s)", *[f"{r['median_generation_s']:.1f}" for r in runs]],
        ["- scoring (s)", *[f"{r['median_scoring_s']:.2f}" for r in runs]],
        ["- no-grad forwards: pi_old, reference, critic (s)", *[f"{r['median_nograd_forward_s']:.1f}" for r in runs]],
        ["- update (s)", *[f"{r['median_update_s']:.1f}" for r in runs]],
        ["generated tokens/s", *[f"{r['generated_tokens_per_s']:.0f}" for r in runs]],
        ["training time (min)", *[f"{r['train_time_s'] / 60:.1f}" for r in runs]],
        [f"reward, first {LAST} steps", *[f"{r['reward_first']:.3f}" for r in runs]],
        [f"reward, last {LAST} steps", *[f"{r['reward_last']:.3f}" for r in runs]],
        [f"held-out accuracy at step {report['steps']}", *[_pct(r["eval_at_equal_steps"]["accuracy"]) for r in runs]],
        [f"held-out format rate at step {report['steps']}",
         *[_pct(r["eval_at_equal_steps"]["format_rate"]) for r in runs]],
        [f"steps done in {report['equal_time_s'] / 60:.1f} min (equal time)",
         *[str(r["steps_at_equal_time"]) for r in runs]],
        [f"reward at equal time (last {LAST} steps)", *[f"{r['reward_at_equal_time']:.3f}" for r in runs]],
        ["held-out accuracy at equal time (checkpoint step)",
         *[f"{_pct(r['eval_at_equal_time']['accuracy'])} ({r['eval_at_equal_time']['step']})" for r in runs]],
        ["held-out format rate at equal time", *[_pct(r["eval_at_equal_time"]["format_rate"]) for r in runs]],
    ]
    return header, rows


def markdown(report: dict) -> str:
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    b = report["base_eval"]
    return (f"# grouprl compare: {', '.join(r['name'] for r in report['runs'])}\n\n"
            f"Model {report['model']}, task {report['task']}, {report['steps']} steps of "
            f"{report['prompts_per_step']} prompts x G = {report['group_size']}, seed {report['seed']}. "
            f"Held-out: {report['eval_problems']} problems, greedy; the base model scores "
            f"{_pct(b['accuracy'])} accuracy, {_pct(b['format_rate'])} format rate.\n\n"
            + "\n".join(lines) + "\n\n![reward vs step](reward_vs_step.png)\n![reward vs time](reward_vs_time.png)\n")


def plot(cfgs: dict[str, TrainConfig], out: Path, window: int = 5) -> list[Path]:
    """Reward (a `window`-step moving average) against step and against training time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, label, fname in [("step", "step", "reward_vs_step.png"),
                                ("time", "training time (min)", "reward_vs_time.png")]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (name, cfg) in enumerate(cfgs.items()):
            h = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
            xs = [r["step"] for r in h] if x_key == "step" else [t / 60 for t in cumulative_time(h)]
            ys = [r["reward"] for r in h]
            smooth = [mean(ys[max(0, k - window + 1):k + 1]) for k in range(len(ys))]
            ax.plot(xs, ys, color=f"C{i}", alpha=0.25)
            ax.plot(xs, smooth, color=f"C{i}", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel(f"reward ({window}-step mean)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def samples(cfg: TrainConfig, k: int = 3) -> list[dict]:
    """The first k completions of the run's last step, with their rewards."""
    path = Path(cfg.output_dir) / "completions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    last = [r for r in rows if r["step"] == rows[-1]["step"]]
    return last[:k]


def html_page(report: dict, cfgs: dict[str, TrainConfig]) -> str:
    header, rows = table_rows(report)
    e = html.escape
    table = ("<table id='comparison'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"
             + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>")
    sections = []
    for name, cfg in cfgs.items():
        items = "".join(f"<div class='sample'><div class='meta'>reward {s['reward']:.2f} · answer {e(str(s.get('answer')))}"
                        f"</div><pre>{e(s['completion'])}</pre></div>" for s in samples(cfg))
        sections.append(f"<section class='run' data-run='{e(name)}'><h3>{e(name)}</h3>{items}</section>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>grouprl compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child {{ text-align: left; }} img {{ max-width: 49%; }}
pre {{ background: #f6f6f6; padding: 8px; white-space: pre-wrap; }} .meta {{ color: #555; font-size: 90%; }}
</style></head><body>
<h1>grouprl compare</h1>
<p>{e(report['model'])}, task {e(report['task'])}, {report['steps']} steps of {report['prompts_per_step']} prompts
x G = {report['group_size']}, seed {report['seed']}; held-out: {report['eval_problems']} problems, greedy.</p>
{table}
<h2>Reward</h2>
<img id="by-step" src="reward_vs_step.png" alt="reward vs step"><img id="by-time" src="reward_vs_time.png" alt="reward vs time">
<h2>Sample completions (last step)</h2>
{''.join(sections)}
</body></html>
"""
