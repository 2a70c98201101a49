"""The comparison report: each arm's figures as a mean and 95% interval over seeds, each arm against the first
(paired by seed and problem), the plots and sample completions, from the per-run figures that
`compare.summarise` gathers and the runs' metrics logs.

    intervals      Student t across seeds (stats.mean_interval); held-out accuracy also by a bootstrap over
                   problems (stats.bootstrap_accuracy)
    paired tests   final held-out accuracy: hierarchical bootstrap over seeds and problems, and paired t over
                   the seeds' accuracies (with 3 seeds the bootstrap has only 10 distinct seed resamples: read
                   the two together); every other figure: paired t over seeds. "yes" when the 95% interval of
                   the difference excludes 0. With one seed there is no interval over seeds (null in JSON).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from grouprl.config import TrainConfig
from grouprl.metrics import read_metrics
from grouprl.stats import Interval, Paired, bootstrap_accuracy, mean_interval, paired_bootstrap_accuracy, paired_t

LAST = 5  # steps averaged for "reward at the start / at the end"

# (key in a run's figures, label, format) for the table; "{n}"-style labels are filled from the report
FIGURES = [
    ("peak_memory_gib", "peak memory (GiB)", "{:.2f}"),
    ("median_step_s", "median step (s)", "{:.1f}"),
    ("median_generation_s", "- generation (s)", "{:.1f}"),
    ("median_scoring_s", "- scoring (s)", "{:.2f}"),
    ("median_nograd_forward_s", "- no-grad forwards: pi_old, reference, critic (s)", "{:.1f}"),
    ("median_update_s", "- update (s)", "{:.1f}"),
    ("generated_tokens_per_s", "generated tokens/s", "{:.0f}"),
    ("passes_sample_per_step", "token-passes per step (k): sampling", "k{:.1f}"),
    ("passes_forward_per_step", "- training forwards (no-grad and with gradient)", "k{:.1f}"),
    ("passes_backward_per_step", "- backwards", "k{:.1f}"),
    ("passes_total", "token-passes in all (M)", "M{:.2f}"),
    ("train_time_s", "training time (min)", "m{:.1f}"),
    ("reward_first", f"reward, first {LAST} steps", "{:.3f}"),
    ("reward_last", f"reward, last {LAST} steps", "{:.3f}"),
    ("explained_var_last10", "critic explained variance, mean of the last 10 steps", "{:.2f}"),
    ("explained_var_median10", "- median of the last 10 steps", "{:.2f}"),
    ("start.accuracy", "held-out accuracy at step 0 (the model it starts from)", "%"),
    ("start.accuracy_by_steps.1", "- one-step problems", "%"),
    ("start.accuracy_by_steps.2", "- two-step problems", "%"),
    ("accuracy", "held-out accuracy at the last step", "%"),
    ("accuracy_by_steps.1", "- one-step problems", "%"),
    ("accuracy_by_steps.2", "- two-step problems", "%"),
    ("format_rate", "held-out format rate at the last step", "%"),
    ("tool_calls", "tool calls per held-out episode", "{:.2f}"),
    ("turns", "model turns per held-out episode", "{:.2f}"),
    ("tool_checked", "held-out episodes that check their answer with a further call", "%"),
    ("self_verification", "self-verification in the text (held-out, last step)", "%"),
    ("eval_at_equal_time.step", "checkpoint step at equal time", "{:.1f}"),
    ("eval_at_equal_time.accuracy", "held-out accuracy at equal time", "%"),
    ("eval_at_equal_compute.step", "checkpoint step at equal token-passes", "{:.1f}"),
    ("eval_at_equal_compute.accuracy", "held-out accuracy at equal token-passes", "%"),
]
# figures tested arm against the first arm (accuracy by the bootstrap, the others by paired t)
PAIRED = ["accuracy", "accuracy_by_steps.2", "eval_at_equal_time.accuracy", "eval_at_equal_compute.accuracy",
          "reward_last", "self_verification", "tool_checked", "peak_memory_gib", "median_step_s", "train_time_s",
          "passes_total"]

SPEC = {key: spec for key, _, spec in FIGURES}
# the figures that can be below 0
SIGNED = {"reward_first", "reward_last", "explained_var_last10", "explained_var_median10"}
DIFF = {"%": (-1.0, 1.0)}  # the range a difference of rates can take


def possible_range(key: str, spec: str, steps: int) -> tuple[float, float] | None:
    """The range a figure can take, to cut its interval to: a rate [0, 1], a checkpoint's step [0, steps];
    other counts, sizes and times [0, inf)."""
    if key in SIGNED:
        return None
    return (0.0, 1.0) if spec == "%" else (0.0, steps) if key.endswith(".step") else (0.0, float("inf"))


PAIRED_NOTE = ("Difference [95% interval], p, significant at 5% (the interval excludes 0). Held-out accuracy at "
               "the last step: bootstrap over seeds and problems, and paired t over the seeds' accuracies; the rest: "
               "paired t over seeds.")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def cumulative(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def cumulative_time(rows: list[dict]) -> list[float]:
    return cumulative([r["step_time"] for r in rows])


def value(run: dict, key: str):
    """A figure of a run's dict by dotted key ('eval_at_equal_time.accuracy'); None where the run has none
    (a supervised run has no reward, a task without steps no accuracy by steps)."""
    for part in key.split("."):
        if not isinstance(run, dict) or run.get(part) is None:
            return None
        run = run[part]
    return run


def _interval(i: Interval | Paired) -> dict:
    """As JSON: nan (one seed) becomes null."""
    out = {k: (None if v != v else float(v)) if k != "n" else int(v) for k, v in vars(i).items()}
    return out | ({"significant": bool(i.significant)} if isinstance(i, Paired) else {})


def aggregate(runs: dict[str, list[dict]]) -> list[dict]:
    """Per arm (in the given order, each with the same seeds): every figure as mean and interval over seeds,
    the final accuracy's bootstrap interval over problems, and each figure against the first arm's."""
    arms = []
    first = next(iter(runs.values()))
    for name, per_seed in runs.items():
        steps = max(r["steps"] for r in per_seed)
        figures = {key: _interval(mean_interval([value(r, key) for r in per_seed],
                                                within=possible_range(key, spec, steps)))
                   for key, _, spec in FIGURES if all(value(r, key) is not None for r in per_seed)}
        arm = {"name": name, "algo": per_seed[0]["algo"], "overrides": per_seed[0]["overrides"],
               "seeds": [r["seed"] for r in per_seed],
               "models_trained": per_seed[0]["models_trained"], "models_in_memory": per_seed[0]["models_in_memory"],
               "trainable_parameters": per_seed[0]["trainable_parameters"], "device": per_seed[0]["device"],
               "world_size": per_seed[0]["world_size"], "figures": figures,
               "accuracy_bootstrap": _interval(bootstrap_accuracy([r["correct"] for r in per_seed])),
               "runs": per_seed, "paired": {}}
        if per_seed is not first:
            for key in PAIRED:
                if any(value(r, key) is None for r in first + per_seed):
                    continue
                if key == "accuracy":
                    test = paired_bootstrap_accuracy([r["correct"] for r in first], [r["correct"] for r in per_seed])
                else:
                    test = paired_t([value(r, key) for r in first], [value(r, key) for r in per_seed],
                                    within=DIFF.get(SPEC[key]))
                arm["paired"][key] = _interval(test)
            arm["paired"]["accuracy_t"] = _interval(paired_t([r["accuracy"] for r in first],
                                                             [r["accuracy"] for r in per_seed], within=DIFF["%"]))
        arms.append(arm)
    return arms


def _fmt(x: float, spec: str) -> str:
    if spec == "%":
        return f"{100 * x:.1f}%"
    if spec[0] in "kMm":  # thousands, millions, minutes
        return spec[1:].format(x / {"k": 1e3, "M": 1e6, "m": 60}[spec[0]])
    return spec.format(x)


def _cell(fig: dict | None, spec: str) -> str:
    """'mean [lo, hi]' (the 95% interval over seeds), or the mean alone from one seed."""
    if fig is None:
        return "-"
    if fig["lo"] is None:
        return _fmt(fig["mean"], spec)
    return f"{_fmt(fig['mean'], spec)} [{_fmt(fig['lo'], spec)}, {_fmt(fig['hi'], spec)}]"


def _diff(test: dict, spec: str) -> str:
    """'+12.3% [1.0, 20.0] p=0.03 yes': the difference to the first arm, its interval, p, significant."""
    sign = "+" if test["diff"] >= 0 else ""
    if test["lo"] is None:
        return f"{sign}{_fmt(test['diff'], spec)} (one seed: no interval)"
    return (f"{sign}{_fmt(test['diff'], spec)} [{_fmt(test['lo'], spec)}, {_fmt(test['hi'], spec)}] "
            f"p={'-' if test['p'] is None else format(test['p'], '.3f')} {'yes' if test['significant'] else 'no'}")


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison table: one column per arm, every figure as mean [95% interval over seeds]."""
    arms = report["arms"]
    header = ["", *[a["name"] for a in arms]]
    rows = [
        ["models trained", *[str(a["models_trained"]) for a in arms]],
        ["models held in memory", *[str(a["models_in_memory"]) for a in arms]],
        ["trainable parameters", *[f"{a['trainable_parameters']:,}" for a in arms]],
    ]
    for key, label, spec in FIGURES:
        if any(key in a["figures"] for a in arms):
            rows.append([label.format(**report), *[_cell(a["figures"].get(key), spec) for a in arms]])
        if key == "accuracy":
            rows.append(["- 95% interval by bootstrap over problems",
                         *[_cell(a["accuracy_bootstrap"], spec) for a in arms]])
    return header, rows


def paired_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Each arm minus the first: difference [95% interval] p significant, per tested figure."""
    arms = report["arms"]
    specs = {key: (label.format(**report), spec) for key, label, spec in FIGURES}
    header = ["", *[f"{a['name']} - {arms[0]['name']}" for a in arms[1:]]]
    rows = [[specs[key][0] + (": bootstrap over seeds and problems" if key == "accuracy" else ""),
             *[_diff(a["paired"][key], specs[key][1]) if key in a["paired"] else "-" for a in arms[1:]]]
            for key in PAIRED if any(key in a["paired"] for a in arms[1:])]
    rows.insert(1, [specs["accuracy"][0] + ": paired t over seeds", *[_diff(a["paired"]["accuracy_t"], "%")
                                                                        for a in arms[1:]]])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def intro(report: dict) -> str:
    b, seeds = report["base_eval"], report["seeds"]
    arms = report["arms"]
    steps = {a["name"]: max(r["steps"] for r in a["runs"]) for a in arms}
    shape = (f"{report['steps']} steps of {report['prompts_per_step']} prompts x G = {report['group_size']}"
             if len(set(steps.values())) == 1 else
             f"steps {', '.join(f'{n} {s}' for n, s in steps.items())} (RL steps of {report['prompts_per_step']} "
             f"prompts x G = {report['group_size']})")
    starts = [a["name"] for a in arms if any(o.startswith("model.name_or_path=@") for o in a["overrides"])]
    return (f"Model {report['model']}, task {report['task']}, {shape}, seeds {', '.join(map(str, seeds))} (each arm "
            "once per seed" + (f"; {', '.join(starts)} start{'s' * (len(starts) == 1)} from another arm's last "
                               "checkpoint of the same seed" if starts else "") + "). "
            f"Held-out: {report['eval_problems']} problems, greedy; the base model scores {100 * b['accuracy']:.1f}% "
            f"accuracy, {100 * b['format_rate']:.1f}% format rate. Cells: mean over seeds [95% interval, cut to the "
            "possible range: 0-100% for a rate, >= 0 for a count or time]. "
            "Equal time and equal token-passes: each seed's budget is its cheapest RL arm's whole run (a "
            "warm-up's time not counted); an RL arm is evaluated at its last checkpoint within it.")


def markdown(report: dict) -> str:
    lines = [f"# grouprl compare: {', '.join(a['name'] for a in report['arms'])}", "", intro(report), ""]
    lines += _md_table(*table_rows(report))
    if len(report["arms"]) > 1:
        lines += ["", f"## Against {report['arms'][0]['name']} (paired by seed and problem)", "",
                  PAIRED_NOTE, ""]
        lines += _md_table(*paired_rows(report))
    lines += ["", "![reward vs step](reward_vs_step.png)", "![reward vs time](reward_vs_time.png)",
              "![held-out accuracy vs step and token-passes](accuracy.png)"]
    if _episodic(report):
        lines += ["![tool use over training](episodes.png)"]
    if any(a["algo"] == "ppo" for a in report["arms"]):
        lines += ["![critic](critic.png)"]
    return "\n".join(lines) + "\n"


def _episodic(report: dict) -> bool:
    """Whether an RL arm ran episodes with an environment (and episodes.png was drawn)."""
    return any(a["algo"] != "sft" and "turns" in a["figures"] for a in report["arms"])


def _series_mean(series: list[list[tuple[int, float, float]]]) -> list[tuple[float, float]]:
    """The mean (x, y) over several (step, x, y) series at each step that every series has."""
    common = sorted(set.intersection(*[{k for k, _, _ in s} for s in series]))
    at = [{k: (x, y) for k, x, y in s} for s in series]
    return [(mean([a[k][0] for a in at]), mean([a[k][1] for a in at])) for k in common]


def _lines(ax, color: str, label: str, series: list[list[tuple[int, float, float]]]) -> None:
    """Each seed thin, their mean (step by step) bold. series: one list of (step, x, y) per seed."""
    for s in series:
        ax.plot([x for _, x, _ in s], [y for _, _, y in s], color=color, alpha=0.3, linewidth=0.8)
    m = _series_mean(series)
    ax.plot([x for x, _ in m], [y for _, y in m], color=color, linewidth=2.2, label=label)


def _smooth(ys: list[float], window: int) -> list[float]:
    return [mean(ys[max(0, k - window + 1):k + 1]) for k in range(len(ys))]


def plot(report: dict, cfgs: dict[str, dict[int, TrainConfig]], out: Path, window: int = 5) -> list[Path]:
    """reward_vs_step/time.png (a `window`-step moving average), accuracy.png (held-out accuracy against step
    and token-passes), with an environment episodes.png (EPISODE_CURVES against step) and, with a PPO arm,
    critic.png (value loss and explained variance): each seed thin,
    the mean over seeds bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = {name: [read_metrics(Path(c.output_dir) / "metrics.jsonl") for c in arm.values()]
            for name, arm in cfgs.items()}
    colors = {name: f"C{i}" for i, name in enumerate(hist)}
    rewarded = {name: runs for name, runs in hist.items() if all("reward" in r for h in runs for r in h)}  # not SFT
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)

    for x_key, label, fname in [("step", "step", "reward_vs_step.png"),
                                ("time", "training time (min)", "reward_vs_time.png")]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, runs in rewarded.items():
            series = []
            for h in runs:
                xs = [r["step"] for r in h] if x_key == "step" else [t / 60 for t in cumulative_time(h)]
                series.append(list(zip([r["step"] for r in h], xs, _smooth([r["reward"] for r in h], window))))
            _lines(ax, colors[name], name, series)
        ax.set(xlabel=label, ylabel=f"reward ({window}-step mean)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, fname)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm in report["arms"]:
        for ax, x_key, scale in [(axes[0], "step", 1), (axes[1], "passes", 1e6)]:
            if arm["algo"] != "sft" or x_key == "step":  # (a supervised run counts no token-passes)
                _lines(ax, colors[arm["name"]], arm["name"], [[(c["step"], c[x_key] / scale, 100 * c["accuracy"])
                                                                for c in r["curve"]] for r in arm["runs"]])
    axes[0].set(xlabel="step", ylabel="held-out accuracy (%)")
    axes[1].set(xlabel="token-passes (millions): sampling + training forwards + backwards")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    save(fig, "accuracy.png")

    episodic = {name: runs for name, runs in rewarded.items() if all("episode/turns" in r for h in runs for r in h)}
    if episodic:  # the tool's use over training: does the model stop calling it (turns collapse)?
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
        for name, runs in episodic.items():
            for ax, key in zip(axes.flat, EPISODE_CURVES):
                _lines(ax, colors[name], name, [[(r["step"], r["step"], _episode_value(r, key)) for r in h]
                                                for h in runs])
        for ax, (key, label) in zip(axes.flat, EPISODE_CURVES.items()):
            ax.set(xlabel="step", ylabel=label)
            ax.grid(alpha=0.3)
        axes[0, 0].legend()
        save(fig, "episodes.png")

    critics = {name: runs for name, runs in hist.items() if any("value_loss" in r for r in runs[0])}
    if critics:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, runs in critics.items():
            for ax, key in [(axes[0], "value_loss"), (axes[1], "explained_var")]:
                _lines(ax, colors[name], name, [[(r["step"], r["step"], r[key]) for r in h if key in r] for h in runs])
        axes[0].set(xlabel="step", ylabel="value loss (0.5 (V - R)^2, token mean)")
        axes[1].set(xlabel="step", ylabel="explained variance of V_old (1 - Var(R - V) / Var(R))")
        lo, hi = axes[1].get_ylim()  # a step whose returns hardly vary can read -30: the axis stops at -1
        axes[1].set_ylim(max(lo, -1.05), min(hi, 1.05))
        if lo < -1.05:
            axes[1].set_title("axis cut at -1 (steps whose returns hardly vary)", fontsize=9)
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        save(fig, "critic.png")
    return paths


# training curves of runs with an environment (episodes.png): metric -> axis label
EPISODE_CURVES = {
    "episode/tool_rate": "episodes that call the tool",
    "episode/turns": "model turns per episode",
    "episode/tool_errors": "tool errors per episode",
    "episode/tool_checked": "episodes that check the answer with a further call",
}


def _episode_value(row: dict, key: str) -> float:
    return row.get(key, float("nan"))  # (a run logged before the metric existed)


def _html_table(header: list[str], rows: list[list[str]], id_: str) -> str:
    e = html.escape
    return (f"<table id='{id_}'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>")


def html_page(report: dict) -> str:
    e = html.escape
    sections = []
    for arm in report["arms"]:
        run = arm["runs"][0]
        items = "".join(f"<div class='sample'><pre>{e(c)}</pre></div>" for c in run["samples"])
        checks = "".join(f"<div class='sample check'><pre>{e(c)}</pre></div>"
                         for r in arm["runs"] for c in r["self_verification_examples"][:2])
        sections.append(f"<section class='run' data-run='{e(arm['name'])}'><h3>{e(arm['name'])}</h3>"
                        f"<p class='meta'>held-out completions of seed {run['seed']} at the last step</p>{items}"
                        f"<p class='meta'>completions the self-verification rules flag (grouprl/verification.py), "
                        f"all seeds: {'none' if not checks else ''}</p>{checks}</section>")
    paired = (f"<h2>Against {e(report['arms'][0]['name'])} (paired by seed and problem)</h2><p>{e(PAIRED_NOTE)}</p>"
              + _html_table(*paired_rows(report), "paired")) if len(report["arms"]) > 1 else ""
    critic = ("<img id='episodes' src='episodes.png' alt='tool use over training'>" if _episodic(report) else "") + (
        "<img id='critic' src='critic.png' alt='critic'>" if any(
        a["algo"] == "ppo" for a in report["arms"]) else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>grouprl compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px;
text-align: right; }} td:first-child {{ text-align: left; }} img {{ max-width: 49%; }}
pre {{ background: #f6f6f6; padding: 8px; white-space: pre-wrap; }} .meta {{ color: #555; font-size: 90%; }}
</style></head><body>
<h1>grouprl compare</h1>
<p>{e(intro(report))}</p>
{_html_table(*table_rows(report), "comparison")}
{paired}
<h2>Curves</h2>
<img id="by-step" src="reward_vs_step.png" alt="reward vs step"><img id="by-time" src="reward_vs_time.png"
alt="reward vs time"><img id="accuracy" src="accuracy.png" alt="held-out accuracy">{critic}
<h2>Sample completions</h2>
{''.join(sections)}
</body></html>
"""


def write_report(report: dict, cfgs: dict[str, dict[int, TrainConfig]], out: Path) -> None:
    """report.json, report.md, the plots and index.html in `out`."""
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    plot(report, cfgs, out)
    (out / "report.md").write_text(markdown(report))
    (out / "index.html").write_text(html_page(report))
