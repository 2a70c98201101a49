"""`grouprl compare`: GRPO, PPO and named variants on the same task, model, prompt budget and seed, each
trained in a process of its own (so that its peak memory is its own), then evaluated and reported.

    <out>/runs/<name>/     each run's output_dir (config.yaml, metrics, checkpoints every save_every steps)
    <out>/report.json      every figure below, per run
    <out>/report.md        the table
    <out>/reward_vs_step.png, reward_vs_time.png
    <out>/index.html       the table, the plots and sample completions of each run (report.py renders them)

A comparison that is interrupted continues where it stopped when run again with the same arguments:
finished runs are kept, an unfinished one resumes from its latest checkpoint (`train --resume`), and
evaluations already written are reused.

"At equal wall-clock time" compares each run at the training time of the fastest run (the sum of its step
times): a run is evaluated at its latest checkpoint within that time.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from grouprl.checkpoint import complete_checkpoints
from grouprl.config import TrainConfig, config_changes, load_config, parse_overrides, save_config
from grouprl.errors import UserError
from grouprl.metrics import read_metrics
from grouprl.report import LAST, cumulative_time, html_page, markdown, mean, plot

# Named variants: overrides on top of the base config. Unnamed settings keep the base config's values.
PRESETS: dict[str, list[str]] = {
    "grpo": ["algo=grpo"],
    "ppo": ["algo=ppo"],
    "ppo-head": ["algo=ppo", "ppo.critic.kind=head"],
    "dr-grpo": ["algo=grpo", "grpo.advantage=mean", "grpo.loss_agg=constant"],
    "dapo": ["algo=grpo", "grpo.eps_high=0.28", "grpo.loss_agg=token_mean", "grpo.dynamic_sampling=true"],
    "gspo": ["algo=grpo", "grpo.ratio=sequence"],
    "rank": ["algo=grpo", "grpo.advantage=rank"],
    "rloo": ["algo=grpo", "grpo.advantage=rloo"],
}


@dataclass
class RunSpec:
    name: str
    overrides: list[str]

    @staticmethod
    def parse(text: str) -> RunSpec:
        """'ppo' (a preset), or 'label:key=value key=value' (overrides on the preset of that name, if any)."""
        name, _, rest = text.partition(":")
        name = name.strip()
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"--run {text!r}: expected a name (letters, digits, - or _), e.g. 'ppo' or "
                            "'mine:grpo.advantage=rank grpo.beta=0.01'")
        if not rest and name not in PRESETS:
            raise UserError(f"--run {text!r}: {name!r} is not a preset ({', '.join(PRESETS)}); "
                            "give overrides as 'name:key=value ...'")
        overrides = PRESETS.get(name, []) + shlex.split(rest)
        parse_overrides(overrides)  # a malformed key=value fails here, naming it
        return RunSpec(name, overrides)


def run_configs(config: Path | None, sets: list[str], specs: list[RunSpec], out: Path,
                save_every: int) -> dict[str, TrainConfig]:
    """Each run's validated config: base file + --set + the run's overrides, in out/runs/<name>."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"--run names must differ, got {names}")
    cfgs = {}
    for spec in specs:
        try:
            cfg = load_config(config, sets + spec.overrides + [f"output_dir={out / 'runs' / spec.name}",
                                                               f"save_every={save_every}"])
        except UserError as e:
            raise UserError(f"run {spec.name!r}: {e}") from None
        cfgs[spec.name] = cfg
    steps = {c.steps for c in cfgs.values()}
    budget = {(c.rollout.prompts_per_step, c.rollout.group_size, c.task.model_dump_json(), c.model.name_or_path,
               c.seed) for c in cfgs.values()}
    if len(steps) > 1 or len(budget) > 1:
        raise UserError("the runs must share steps, prompts_per_step, group_size, task, model and seed "
                        "(the comparison holds the prompt budget fixed); leave those out of --run")
    return cfgs


# Settings that change how fast a run goes or where it writes, never what it computes.
NO_EFFECT = {"output_dir", "save_every", "save_merged", "save_total_limit", "max_nonfinite_steps", "rewards_timeout_s",
             "threads", "eval", "distributed", "rollout.engine", "rollout.static_cache", "rollout.compile",
             "model.attn_implementation", "model.update_layout", "model.device"}


def without_effect(cfg: TrainConfig) -> dict[str, str]:
    """The settings of cfg that cannot change its training at its other settings, each with the reason."""
    out = {}
    g = cfg.grpo
    if cfg.algo == "grpo" and g.mu == 1 and g.minibatches == 1:
        why = (f"with grpo.mu=1 and grpo.minibatches=1 each batch takes one optimizer step on-policy, so the ratio "
               f"is exactly 1: never clipped, and a sequence-level ratio has the token-level gradient")
        out |= {"grpo.ratio": why, "grpo.eps_low": why, "grpo.eps_high": why}
    if cfg.algo == "grpo" and g.beta == 0:
        out["grpo.ref_refresh_steps"] = "with grpo.beta=0 there is no reference"
    return out


def _flat(cfg: TrainConfig) -> dict:
    out = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(cfg.model_dump(mode="json"))
    return out


def _ignored(cfg: TrainConfig, key: str) -> str | None:
    """Why `key` cannot change cfg's training (None: it can)."""
    if key in NO_EFFECT or key.split(".")[0] in NO_EFFECT:
        return "speed and output settings"
    if key.startswith("ppo." if cfg.algo == "grpo" else "grpo."):
        return f"{key.split('.')[0]} settings do not apply to {cfg.algo}"
    return without_effect(cfg).get(key)


def check_arms_differ(cfgs: dict[str, TrainConfig]) -> list[str]:
    """Refuse (one line) two runs that would train the same way; return a warning for each setting a run sets
    away from its default that has no effect at its other settings (DAPO's eps_high at mu = 1, say)."""
    flat = {name: _flat(cfg) for name, cfg in cfgs.items()}
    names = list(cfgs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if cfgs[a].algo != cfgs[b].algo:
                continue
            differ = [k for k in flat[a] if flat[a][k] != flat[b][k] and k != "output_dir"]
            reasons = [_ignored(cfgs[a], k) for k in differ]
            if all(reasons):
                why = "; ".join(dict.fromkeys(f"{k}: {r}" for k, r in zip(differ, reasons))) or "equal settings"
                raise UserError(f"runs {a!r} and {b!r} would train identically at these settings ({why}): drop "
                                "one, or set what makes them differ (e.g. --set grpo.mu=2)")
    default = _flat(TrainConfig())
    return [f"{name}: {key}={flat[name][key]} has no effect here ({why})" for name, cfg in cfgs.items()
            for key, why in without_effect(cfg).items() if flat[name][key] != default[key]]


def _done_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(read_metrics(path)) if path.is_file() else 0


def _finished(run_dir: Path, steps: int) -> bool:
    found = complete_checkpoints(run_dir)
    return bool(found) and found[-1][1].name == "final" and found[-1][0] >= steps


def check_unchanged(name: str, cfg: TrainConfig) -> None:
    """A run already in the report folder must have been made with the same settings (steps may grow)."""
    saved = Path(cfg.output_dir) / "grouprl.yaml"
    changed = config_changes(load_config(saved), cfg) if saved.is_file() else []
    if changed:
        raise UserError(f"run {name!r} in {str(Path(cfg.output_dir).parent.parent)!r} was made with other settings "
                        f"({', '.join(changed)}): use another --out, or delete {str(Path(cfg.output_dir))!r}")


def train_run(name: str, cfg: TrainConfig, on_progress, nproc: int = 1) -> None:
    """Train one run in a child process (nproc > 1: a torchrun job of nproc ranks), resuming it if it has
    started; `on_progress(steps done)` is called while it runs. A failed child stops the comparison with the
    tail of its log."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yaml"
    save_config(cfg, config_file)
    # --resume with --config: a run with a checkpoint continues from it, one without starts afresh (its folder
    # already holds config.yaml and train.log, which a plain new run would refuse)
    args = ["train", "--config", str(config_file), "--resume", str(run_dir)] + (["--nproc", str(nproc)] if nproc > 1
                                                                                 else [])
    log = (run_dir / "train.log").open("a")
    # A session of its own, so that a Ctrl-C in the terminal reaches only this process, which passes on one
    # SIGTERM: the child finishes its step and saves (train's stop), and a second Ctrl-C kills it at once.
    child = subprocess.Popen([sys.executable, "-m", "grouprl", *args], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        while child.poll() is None:
            on_progress(_done_steps(run_dir))
            time.sleep(1.0)
    finally:  # an interrupted comparison stops its child too (it resumes from that checkpoint later)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait()
            except KeyboardInterrupt:
                child.kill()
                child.wait()
                raise
        log.close()
    on_progress(_done_steps(run_dir))
    if child.returncode != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or ["(empty log)"]
        raise UserError(f"run {name!r} failed (exit {child.returncode}): {tail[0]} (log: {run_dir / 'train.log'}); "
                        "run compare again to continue")


def evaluate_checkpoint(model: str, cfg: TrainConfig, num: int, cache: Path) -> dict:
    """Held-out greedy format rate and accuracy of a checkpoint (or the base model), cached in `cache`.

    The cache is reused only when its key matches, the key being what decides the greedy completions: the
    model (its path and, for a folder, name, size and mtime of its weight and config files, so a checkpoint
    trained again at the same path is evaluated again), the task section (problems, system prompt, prefill)
    and the number of problems, max_new_tokens as used, eval.batch_size (left padding changes the numerics
    of batched greedy decoding), dtype and device. eval.k and eval.temperature are left out: greedy only."""
    from grouprl.tasks import build_task

    task = build_task(cfg.task)
    rows = task.eval[:num]
    max_new_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    folder = Path(model)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")
                   or p.name in ("config.json", "adapter_config.json")) if folder.is_dir() else []
    key = json.loads(json.dumps({  # as it reads back from the cache file
        "model": model, "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "task": cfg.task.model_dump_json(), "problems": len(rows), "max_new_tokens": max_new_tokens,
        "batch_size": cfg.eval.batch_size, "dtype": cfg.model.dtype, "device": cfg.model.device,
    }))
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    import torch

    from grouprl.evaluate import evaluate
    from grouprl.models import load_for_inference

    net, tok = load_for_inference(model, cfg.model)
    torch.manual_seed(cfg.seed)
    metrics, _ = evaluate(net, tok, task, rows, prefill=cfg.task.prefill, max_new_tokens=max_new_tokens,
                          batch_size=cfg.eval.batch_size)
    result = {"model": model, "problems": len(rows), **metrics, "key": key}
    cache.write_text(json.dumps(result, indent=1))
    return result


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def checkpoint_at(run_dir: Path, step: int) -> tuple[int, Path]:
    """The latest complete checkpoint at or before `step` (final counts as the last step), or (0, Path())."""
    before = [(s, p) for s, p in complete_checkpoints(run_dir) if s <= step]
    return before[-1] if before else (0, Path())


def summarise(cfgs: dict[str, TrainConfig], overrides: dict[str, list[str]], out: Path, eval_num: int,
              on_eval) -> dict:
    """Every figure of the report, from the runs' files (and evaluations, computed once and cached)."""
    histories = {n: read_metrics(Path(c.output_dir) / "metrics.jsonl") for n, c in cfgs.items()}
    equal_time = min(cumulative_time(h)[-1] for h in histories.values())
    first = next(iter(cfgs.values()))
    base = evaluate_checkpoint(first.model.name_or_path, first, eval_num, out / "eval-base.json")
    on_eval()
    runs = []
    for name, cfg in cfgs.items():
        run_dir, h = Path(cfg.output_dir), histories[name]
        info = json.loads((run_dir / "run_info.json").read_text())
        times = cumulative_time(h)
        within = [r for r, t in zip(h, times) if t <= equal_time + 1e-9]
        final = evaluate_checkpoint(str(run_dir / "final"), cfg, eval_num, run_dir / f"eval-step-{cfg.steps}.json")
        on_eval()
        eq_step, eq_dir = checkpoint_at(run_dir, within[-1]["step"] if within else 0)
        if eq_step == 0:
            eq_eval = base
        else:
            eq_eval = evaluate_checkpoint(str(eq_dir), cfg, eval_num, run_dir / f"eval-step-{eq_step}.json")
        on_eval()
        update = [r["update_time"] - r.get("prep_time", 0.0) for r in h]
        runs.append({
            "name": name, "algo": cfg.algo, "overrides": overrides[name],
            "models_trained": info["models_trained"], "models_in_memory": info["models_in_memory"],
            "trainable_parameters": info["trainable_parameters"], "device": info["device"],
            "world_size": info.get("world_size", 1),  # peak memory: of the largest rank
            "peak_memory_gib": max(r.get("peak_mem_gib_max", r["peak_mem_gib"]) for r in h),
            "median_step_s": _median(h, "step_time"), "median_generation_s": _median(h, "gen_time"),
            "median_scoring_s": _median(h, "score_time"),
            "median_nograd_forward_s": statistics.median(r.get("prep_time", 0.0) for r in h),
            "median_update_s": statistics.median(update),
            "generated_tokens_per_s": _median(h, "gen_tokens_per_s"),
            "train_time_s": times[-1], "steps": len(h),
            "reward_first": mean([r["reward"] for r in h[:LAST]]),
            "reward_last": mean([r["reward"] for r in h[-LAST:]]),
            "reward_at_equal_time": mean([r["reward"] for r in within[-LAST:]]),
            "steps_at_equal_time": len(within),
            "eval_at_equal_steps": {"step": cfg.steps, "accuracy": final["accuracy"],
                                    "format_rate": final["format_rate"]},
            "eval_at_equal_time": {"step": eq_step, "accuracy": eq_eval["accuracy"],
                                   "format_rate": eq_eval["format_rate"]},
        })
    return {"equal_time_s": equal_time, "eval_problems": base["problems"],
            "base_eval": {"accuracy": base["accuracy"], "format_rate": base["format_rate"]},
            "model": first.model.name_or_path, "task": first.task.name, "steps": first.steps,
            "prompts_per_step": first.rollout.prompts_per_step, "group_size": first.rollout.group_size,
            "seed": first.seed, "runs": runs}


def compare(config: Path | None, sets: list[str], run_texts: list[str], out: Path, *, eval_num: int,
            save_every: int, console: Console | None = None, nproc: int = 1) -> dict:
    """Run the comparison (continuing an interrupted one) and write the report; returns the report dict."""
    console = console or Console()
    specs = [RunSpec.parse(t) for t in run_texts]
    cfgs = run_configs(config, sets, specs, out, save_every)
    for warning in check_arms_differ(cfgs):
        console.print(f"[yellow]warning:[/] {warning}")
    for name, cfg in cfgs.items():
        check_unchanged(name, cfg)
    out.mkdir(parents=True, exist_ok=True)
    total_steps = sum(c.steps for c in cfgs.values())
    evals = 1 + 2 * len(cfgs)
    with Progress(TextColumn("[bold]compare"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task("compare", total=total_steps + evals, info="")
        done_before = 0
        for name, cfg in cfgs.items():
            run_dir = Path(cfg.output_dir)
            if _finished(run_dir, cfg.steps):
                bar.console.print(f"{name}: finished earlier, kept")
            else:
                verb = "resuming" if (run_dir / "grouprl.yaml").is_file() else "training"
                bar.console.print(f"{name}: {verb} ({cfg.algo}) -> {run_dir}")

                def progress(n: int, base=done_before, label=name) -> None:
                    bar.update(job, completed=base + n, info=f"{label} step {n}")

                train_run(name, cfg, progress, nproc)
            done_before += cfg.steps
            bar.update(job, completed=done_before)
        bar.update(job, info="held-out evaluation")
        report = summarise(cfgs, {s.name: s.overrides for s in specs}, out, eval_num, lambda: bar.advance(job))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot(cfgs, out)
    (out / "report.md").write_text(markdown(report))
    (out / "index.html").write_text(html_page(report, cfgs))
    return report
