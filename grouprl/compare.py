"""`grouprl compare`: GRPO, PPO, named variants and supervised stages (arms) on the same task, model and
prompt budget, each arm trained once per seed (--seeds), each run in a process of its own (so that its peak
memory is its own), then every checkpoint evaluated on the held-out problems and the whole reported
(report.py). An arm may start from an earlier arm's last checkpoint of the same seed (model.name_or_path=@arm:
a supervised warm-up, then RL from it).

    <out>/runs/<arm>/seed-<s>/  each run's output_dir (config.yaml, metrics, checkpoints every save_every
                                steps, eval-step-N.json: the held-out result of each checkpoint; start.json:
                                the fingerprint of the checkpoint an @arm run started from)
    <out>/eval-base.json        the held-out result of the first arm's starting model (the base model)
    <out>/evals/                those of the other arms' starting models
    <out>/report.json           every figure, per run and per arm (mean, 95% interval, paired test)
    <out>/report.md             the tables
    <out>/reward_vs_step.png, reward_vs_time.png, accuracy.png, episodes.png (with an environment),
        critic.png (with a PPO arm)
    <out>/index.html            the tables, the plots and sample completions of each arm

A comparison that is interrupted continues where it stopped when run again with the same arguments:
finished runs are kept, an unfinished one resumes from its latest checkpoint (`train --resume`), and
evaluations already written are reused (each is written whole or not at all; a damaged one, or a finished
run's damaged run_info.json, is made again). Seeds run in turn, every arm of a seed before the next seed.

Equal steps: every run at its last step. Equal time and equal token-passes: each seed's budget is the
training time (the sum of step times) or the token-passes (logprobs.TokenPasses) of that seed's cheapest RL
run (supervised runs have neither); a run is evaluated at its last checkpoint within the budget, whose time
and passes are reported.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from grouprl.checkpoint import complete_checkpoints
from grouprl.config import (TrainConfig, config_changes, load_config, parse_overrides, save_config,
                            world_problems)
from grouprl.errors import UserError
from grouprl.metrics import read_metrics
from grouprl.report import LAST, aggregate, cumulative, mean, write_report
from grouprl.guard import RunLock, reward_files, write_atomic
from grouprl.verification import self_checks, verification_rate

# Named variants: overrides on top of the base config. Unnamed settings keep the base config's values.
PRESETS: dict[str, list[str]] = {
    "grpo": ["algo=grpo"],
    "ppo": ["algo=ppo"],
    "ppo-head": ["algo=ppo", "ppo.critic.kind=head"],
    "ppo-adapter": ["algo=ppo", "ppo.critic.kind=adapter"],
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
        try:
            overrides = PRESETS.get(name, []) + shlex.split(rest)
        except ValueError as e:  # "No closing quotation"
            raise UserError(f"--run {text!r}: {e}: expected 'name:key=value key=value'") from None
        parse_overrides(overrides)  # a malformed key=value fails here, naming it
        return RunSpec(name, overrides)


def base_seed(config: Path | None, sets: list[str]) -> int:
    """The seed of the base config (with --set): the comparison's one seed when --seeds is not given."""
    return load_config(config, sets).seed


FROM = "@"  # model.name_or_path=@arm: start from that arm's final checkpoint of the same seed


def _reference(spec: RunSpec, earlier: list[str]) -> str | None:
    """The earlier arm whose final checkpoint this arm starts from (model.name_or_path=@arm), or None."""
    refs = [o.split("=", 1)[1].strip() for o in spec.overrides
            if o.split("=", 1)[0].strip() == "model.name_or_path" and o.split("=", 1)[1].strip().startswith(FROM)]
    if not refs:
        return None
    name = refs[-1][1:]
    if name not in earlier:
        raise UserError(f"--run {spec.name!r}: model.name_or_path={refs[-1]} names no earlier arm (expected one of "
                        f"{', '.join(earlier) or 'none: list the arm it starts from before it'})")
    return name


def run_configs(config: Path | None, sets: list[str], specs: list[RunSpec], seeds: list[int], out: Path,
                save_every: int) -> dict[str, dict[int, TrainConfig]]:
    """Each run's validated config, arm by arm and seed by seed: base file + --set + the arm's overrides +
    seed, in out/runs/<name>/seed-<seed>. Every checkpoint is kept: each is evaluated for the curves. An arm
    with model.name_or_path=@other starts from the final checkpoint of the earlier arm `other`, seed by seed
    (a supervised warm-up, say, then RL from it)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"--run names must differ, got {names}")
    for spec in specs:
        if any(o.split("=")[0].strip() == "seed" for o in spec.overrides):
            raise UserError(f"--run {spec.name!r} sets seed: seeds come from --seeds (every arm runs every seed)")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise UserError(f"--seeds must be distinct integers, got {seeds}")
    refs = {spec.name: _reference(spec, names[:i]) for i, spec in enumerate(specs)}
    cfgs: dict[str, dict[int, TrainConfig]] = {}
    for spec in specs:
        ref = refs[spec.name]
        cfgs[spec.name] = {}
        for seed in seeds:
            # absolute: a comparison resumed with --out spelled otherwise starts from the same path
            start = [f"model.name_or_path={out.resolve() / 'runs' / ref / f'seed-{seed}' / 'final'}"] if ref else []
            try:
                cfg = load_config(config, sets + spec.overrides + start + [
                    f"seed={seed}", f"output_dir={out / 'runs' / spec.name / f'seed-{seed}'}",
                    f"save_every={save_every}", "save_total_limit=null"])
            except UserError as e:
                raise UserError(f"run {spec.name!r}: {e}") from None
            cfgs[spec.name][seed] = cfg
    rl = [c for arm in cfgs.values() for c in arm.values() if c.algo != "sft"]
    budget = {(c.steps, c.rollout.prompts_per_step, c.rollout.group_size) for c in rl}
    tasks = {c.task.model_dump_json() for arm in cfgs.values() for c in arm.values()}
    models = {c.model.name_or_path for name, ref in refs.items() if ref is None for c in cfgs[name].values()}
    if len(budget) > 1 or len(tasks) > 1 or len(models) > 1:
        raise UserError("the runs must share the task and model, and the RL runs steps, prompts_per_step and "
                        "group_size (the comparison holds the prompt budget fixed; seeds come from --seeds); leave "
                        "those out of --run, or start an arm from another's checkpoint with model.name_or_path=@arm")
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
        why = ("with grpo.mu=1 and grpo.minibatches=1 each batch takes one optimizer step on-policy, so the ratio "
               "is exactly 1: never clipped, and a sequence-level ratio has the token-level gradient")
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
    if key.split(".")[0] in ("grpo", "ppo", "sft") and key.split(".")[0] != cfg.algo:
        return f"{key.split('.')[0]} settings do not apply to {cfg.algo}"
    if cfg.algo == "sft" and key.split(".")[0] in ("rollout", "rewards", "entropy"):
        return "a supervised run samples nothing and scores nothing"
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
    """Trained to its last step, with the run_info.json the report reads (a resume writes a damaged one again)."""
    found = complete_checkpoints(run_dir)
    return bool(found) and found[-1][1].name == "final" and found[-1][0] >= steps and _run_info(run_dir) is not None


def _run_info(run_dir: Path) -> dict | None:
    """The run_info.json a run's training writes at start, or None when it is missing or damaged."""
    info = _read_json(run_dir / "run_info.json")
    needed = {"models_trained", "models_in_memory", "trainable_parameters", "device"}
    return info if info is not None and needed <= set(info) else None


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when there is none: missing, unreadable, cut short or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def check_unchanged(name: str, cfg: TrainConfig) -> None:
    """A run already in the report folder must have been made with the same settings (steps may grow; a
    setting that cannot change its training, such as the other algorithm's section, may change too)."""
    saved = Path(cfg.output_dir) / "grouprl.yaml"
    changed = [k for k in config_changes(load_config(saved), cfg) if not _ignored(cfg, k)] if saved.is_file() else []
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


def _valid_eval(cached: dict | None, key: dict) -> bool:
    """A cached evaluation of this key with every field the report reads, one 0/1 and one completion per problem."""
    if cached is None or cached.get("key") != key:
        return False
    per_problem = [cached.get("correct"), cached.get("completions")]
    rates = [cached.get(k) for k in ("accuracy", "format_rate")]
    return (all(isinstance(r, (int, float)) and math.isfinite(r) for r in rates)
            and all(isinstance(v, list) and len(v) == key["problems"] for v in per_problem)
            and all(c in (0, 1) for c in per_problem[0]) and all(isinstance(c, str) for c in per_problem[1]))


def _fingerprint(folder: Path) -> list:
    """Name, size and mtime of a model folder's weight and config files (empty for an HF id): what tells a
    checkpoint trained again at the same path."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")
                   or p.name in ("config.json", "adapter_config.json")) if folder.is_dir() else []
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _source(cfg: TrainConfig, cfgs: dict[str, dict[int, TrainConfig]]) -> TrainConfig | None:
    """The run (of another arm, same seed) whose final checkpoint this run starts from, or None."""
    start = Path(cfg.model.name_or_path).resolve()
    for other in cfgs.values():
        source = other.get(cfg.seed)
        if source is not None and start == (Path(source.output_dir) / "final").resolve():
            return source
    return None


def check_start(name: str, cfg: TrainConfig, cfgs: dict[str, dict[int, TrainConfig]]) -> None:
    """A run that starts from another arm's final checkpoint records that checkpoint's fingerprint
    (start.json) when it first trains; a later compare refuses to keep or resume it once that checkpoint has
    been trained again, since the run would no longer follow from it."""
    source = _source(cfg, cfgs)
    if source is None:
        return
    run_dir, final = Path(cfg.output_dir), Path(source.output_dir) / "final"
    if not final.is_dir():  # (its training failed: this run's fails too, naming it)
        return
    now, before = _fingerprint(final), _read_json(run_dir / "start.json")
    if before is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "start.json", json.dumps({"model": str(final), "files": now}))
    elif before.get("files") != json.loads(json.dumps(now)):
        raise UserError(f"run {name!r} seed {cfg.seed} started from {str(final)!r}, which has been trained again "
                        f"since: delete {str(run_dir)!r} to train it again from the new one")


def evaluate_checkpoint(model: str, cfg: TrainConfig, num: int, cache: Path, reuse: tuple[Path, ...] = ()) -> dict:
    """Held-out greedy format rate and accuracy of a checkpoint (or the base model), with each problem's
    correctness (0/1, in the held-out order, for the intervals) and completion; cached in `cache`.

    The cache is reused only when its key matches, the key being what decides the greedy completions: the
    model (its path and, for a folder, name, size and mtime of its weight and config files, so a checkpoint
    trained again at the same path is evaluated again), the task section (problems, system prompt, prefill)
    and the number of problems, max_new_tokens as used, eval.batch_size (left padding changes the numerics
    of batched greedy decoding), dtype and device. eval.k and eval.temperature are left out: greedy only.
    A cache that cannot be read or is not such a result (a kill while it was written) is evaluated again.
    `reuse`: other caches that may hold the same evaluation (an arm's start is another arm's final checkpoint)."""
    from grouprl.tasks import build_task

    task = build_task(cfg.task)
    rows = task.eval[:num]
    max_new_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    key = json.loads(json.dumps({  # as it reads back from the cache file
        "model": model, "files": _fingerprint(Path(model)),
        "task": cfg.task.model_dump_json(), "problems": len(rows), "max_new_tokens": max_new_tokens,
        "batch_size": cfg.eval.batch_size, "dtype": cfg.model.dtype, "device": cfg.model.device,
        "version": 3 if cfg.env.name else 2,  # 3: episodes' tool_checked (older ones are evaluated again)
        **({"reward": cfg.eval.reward} if cfg.eval.reward else {}),  # absent when unset: older caches stay valid
        **({"env": [cfg.env.model_dump_json(), reward_files([cfg.env.name])]} if cfg.env.name else {}),
    }))
    for path in (cache, *reuse):
        if _valid_eval(cached := _read_json(path), key):
            return cached
    import torch

    from grouprl.episodes import setup, shown
    from grouprl.evaluate import evaluate
    from grouprl.models import load_for_inference

    if cfg.threads:  # as its training did: two-thread evaluations beside one-thread runs oversubscribe the cores
        torch.set_num_threads(cfg.threads)
    net, tok = load_for_inference(model, cfg.model)
    env = None
    if cfg.env.name:  # episodes: the report shows each one whole, turn by turn
        env, task = setup(cfg.env, tok, task)
    torch.manual_seed(cfg.seed)
    metrics, samples = evaluate(net, tok, task, rows, prefill=cfg.task.prefill, max_new_tokens=max_new_tokens,
                                batch_size=cfg.eval.batch_size, correctness=cfg.eval.reward, env=env)
    result = {"model": model, "problems": len(rows), **metrics,
              "correct": [int(s["correct"] > 0) for s in samples],
              "completions": [shown(s["episode"]) if "episode" in s else s["completion"] for s in samples],
              "key": key}
    write_atomic(cache, json.dumps(result, indent=1))
    return result


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def token_passes(row: dict) -> float:
    """A step's token-passes: sampling (prefill + one per generated token), every training forward (no-grad
    and with gradient) and every backward, of every model (the critic's included); see logprobs.TokenPasses."""
    return row["passes_sample"] + row["passes_forward"] + row["passes_backward"]


def last_within(curve: list[dict], key: str, budget: float) -> dict:
    """The last point of an evaluation curve (step 0 first) whose `key` is within `budget`."""
    return [c for c in curve if c[key] <= budget * (1 + 1e-9)][-1]


def start_cache(name: str, cfg: TrainConfig, out: Path, cfgs: dict[str, dict[int, TrainConfig]]) -> tuple[Path, ...]:
    """Where a run's step-0 evaluation (of the model it starts from) is cached, then the caches that may hold
    it already (each is used only when its key matches): an arm that starts from another's final checkpoint
    reuses that checkpoint's evaluation; arms that start from the same model share one (the first arm's is
    eval-base.json, the others' in evals/)."""
    source = _source(cfg, cfgs)
    (out / "evals").mkdir(parents=True, exist_ok=True)
    if source is not None:
        return (out / "evals" / f"start-{name}-seed-{cfg.seed}.json",
                Path(source.output_dir) / f"eval-step-{source.steps}.json")
    if name == next(iter(cfgs)):  # the first arm's start: the report's base model
        return (out / "eval-base.json",)
    return (out / "evals" / f"start-{name}.json", out / "eval-base.json", *sorted((out / "evals").glob("start-*.json")))


def by_steps(correct: list[int], rows: list[dict]) -> dict[str, float]:
    """Held-out accuracy by the problems' number of steps (rows with a `steps` field, as word_problems'),
    {"1": .., "2": ..}; empty when the rows have none."""
    groups: dict[str, list[int]] = {}
    for c, row in zip(correct, rows):
        if isinstance(row.get("steps"), int):
            groups.setdefault(str(row["steps"]), []).append(c)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def run_figures(name: str, cfg: TrainConfig, out: Path, eval_num: int, on_eval,
                cfgs: dict[str, dict[int, TrainConfig]]) -> dict:
    """Every figure of one run (one arm, one seed): from its metrics, run_info and the held-out evaluation of
    the model it starts from (step 0) and of each of its checkpoints (the curve against step, time and, for
    an RL run, token-passes). A supervised run has no reward, sampling or token-passes: those are None."""
    from grouprl.tasks import build_task

    run_dir = Path(cfg.output_dir)
    info = _run_info(run_dir)
    if info is None:  # (compare resumes a run without one first, which writes it again)
        raise UserError(f"run {name!r} seed {cfg.seed}: {str(run_dir / 'run_info.json')!r} is missing or damaged "
                        "(expected the JSON object its training writes at start): run compare again")
    h = read_metrics(run_dir / "metrics.jsonl")
    rl = cfg.algo != "sft"
    times = cumulative([r["step_time"] for r in h])
    passes = cumulative([token_passes(r) for r in h]) if rl else [None] * len(h)
    rows = build_task(cfg.task).eval[:eval_num]
    curve = []
    for step, folder in [(0, Path(cfg.model.name_or_path))] + complete_checkpoints(run_dir):
        where, *reuse = start_cache(name, cfg, out, cfgs) if step == 0 else (run_dir / f"eval-step-{step}.json",)
        e = evaluate_checkpoint(str(folder), cfg, eval_num, where, tuple(reuse))
        on_eval()
        rate, rules = verification_rate(e["completions"])
        curve.append({"step": step, "time_s": times[step - 1] if step else 0.0,
                      "passes": passes[step - 1] if step else 0.0, "accuracy": e["accuracy"],
                      "accuracy_by_steps": by_steps(e["correct"], rows),
                      "format_rate": e["format_rate"], "self_verification": rate, "rules": rules,
                      **{k: e[k] for k in ("tool_calls", "turns", "tool_checked") if k in e}})
    final = e  # complete_checkpoints ends with final
    update = [r["update_time"] - r.get("prep_time", 0.0) for r in h] if rl else []

    def med(key: str) -> float | None:
        return _median(h, key) if rl else None

    ev = [r["explained_var"] for r in h if "explained_var" in r]
    return {
        "name": name, "seed": cfg.seed, "algo": cfg.algo,
        "models_trained": info["models_trained"], "models_in_memory": info["models_in_memory"],
        "trainable_parameters": info["trainable_parameters"], "device": info["device"],
        "world_size": info.get("world_size", 1),  # peak memory: of the largest rank
        "peak_memory_gib": max(r.get("peak_mem_gib_max", r["peak_mem_gib"]) for r in h),
        "median_step_s": _median(h, "step_time"), "median_generation_s": med("gen_time"),
        "median_scoring_s": med("score_time"),
        "median_nograd_forward_s": statistics.median(r.get("prep_time", 0.0) for r in h) if rl else None,
        "median_update_s": statistics.median(update) if rl else None,
        "generated_tokens_per_s": med("gen_tokens_per_s"),
        "passes_sample_per_step": mean([r["passes_sample"] for r in h]) if rl else None,
        "passes_forward_per_step": mean([r["passes_forward"] for r in h]) if rl else None,
        "passes_backward_per_step": mean([r["passes_backward"] for r in h]) if rl else None,
        "passes_total": passes[-1], "train_time_s": times[-1], "steps": len(h),
        "reward_first": mean([r["reward"] for r in h[:LAST]]) if rl else None,
        "reward_last": mean([r["reward"] for r in h[-LAST:]]) if rl else None,
        "explained_var_last10": mean(ev[-10:]) if ev else None,
        # robust to the steps whose returns hardly vary (every completion scored alike), where 1 - Var(R - V) /
        # Var(R) divides by almost 0 and one step's -30 would swamp the mean
        "explained_var_median10": statistics.median(ev[-10:]) if ev else None,
        "accuracy": final["accuracy"], "format_rate": final["format_rate"], "correct": final["correct"],
        "accuracy_by_steps": curve[-1]["accuracy_by_steps"],
        "start": {k: curve[0][k] for k in ("accuracy", "accuracy_by_steps")},
        **{k: curve[-1].get(k) for k in ("tool_calls", "turns", "tool_checked")},
        "self_verification": curve[-1]["self_verification"],
        "self_verification_examples": [c for c in final["completions"] if self_checks(c)][:3],
        "samples": final["completions"][:2],
        "curve": curve,
    }


def summarise(cfgs: dict[str, dict[int, TrainConfig]], overrides: dict[str, list[str]], out: Path, eval_num: int,
              on_eval) -> dict:
    """Every run's figures, seed by seed, with the equal-time and equal-compute evaluations (each seed's budget
    is that of its cheapest arm), then the arms' means, intervals and paired tests (report.aggregate)."""
    arms = list(cfgs)
    seeds = list(cfgs[arms[0]])
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in seeds:
        figures = {name: run_figures(name, cfgs[name][seed], out, eval_num, on_eval, cfgs) for name in arms}
        rl = [f for f in figures.values() if f["algo"] != "sft"]  # the budgets are the RL runs'
        equal_time = min((f["train_time_s"] for f in rl), default=None)
        equal_passes = min((f["passes_total"] for f in rl), default=None)
        for name, f in figures.items():
            f["equal_time_s"], f["equal_passes"] = equal_time, equal_passes
            for key, budget, label in [("time_s", equal_time, "eval_at_equal_time"),
                                       ("passes", equal_passes, "eval_at_equal_compute")]:
                point = last_within(f["curve"], key, budget) if f["algo"] != "sft" else None
                f[label] = point and {k: point[k] for k in ("step", "time_s", "passes", "accuracy", "format_rate")}
            f["overrides"] = overrides[name]
            runs[name].append(f)
    first, base = cfgs[arms[0]][seeds[0]], runs[arms[0]][0]["curve"][0]  # (the base model's evaluation)
    rl = next((c for arm in cfgs.values() for c in arm.values() if c.algo != "sft"), first)  # the prompt budget's
    return {"model": first.model.name_or_path, "task": first.task.name, "task_settings": first.task.model_dump(),
            "steps": rl.steps, "prompts_per_step": rl.rollout.prompts_per_step,
            "group_size": rl.rollout.group_size, "seeds": seeds,
            "eval_problems": len(runs[arms[0]][0]["correct"]),
            "base_eval": {"accuracy": base["accuracy"], "format_rate": base["format_rate"]},
            "arms": aggregate(runs)}


def compare(config: Path | None, sets: list[str], run_texts: list[str], out: Path, *, eval_num: int,
            save_every: int, seeds: list[int] | None = None, console: Console | None = None, nproc: int = 1) -> dict:
    """Run the comparison (continuing an interrupted one) and write the report; returns the report dict.
    Seeds run in turn, every arm of a seed before the next seed, so a partial comparison is a whole one."""
    console = console or Console()
    specs = [RunSpec.parse(t) for t in run_texts]
    seeds = seeds if seeds is not None else [base_seed(config, sets)]
    cfgs = run_configs(config, sets, specs, seeds, out, save_every)
    for warning in check_arms_differ({name: arm[seeds[0]] for name, arm in cfgs.items()}):
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    for name, arm in cfgs.items():
        for cfg in arm.values():
            check_unchanged(name, cfg)
            if nproc > 1 and (problems := world_problems(cfg, nproc, cfg.distributed.strategy)):
                raise UserError(f"run {name!r} cannot run on {nproc} processes: {problems[0]}")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):  # one compare per report folder: a second one is refused with the holder's pid
        return _compare(cfgs, specs, seeds, out, eval_num, save_every, console, nproc)


def _compare(cfgs: dict, specs: list, seeds: list[int], out: Path, eval_num: int, save_every: int, console: Console,
             nproc: int) -> dict:
    """The runs in order, then the evaluations and the report (see compare)."""
    order = [(seed, name, cfgs[name][seed]) for seed in seeds for name in cfgs]
    total_steps = sum(c.steps for _, _, c in order)
    # every checkpoint (the last step saves only final), final, and the base model
    evals = sum((c.steps - 1) // save_every + 2 for _, _, c in order)
    with Progress(TextColumn("[bold]compare"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task("compare", total=total_steps + evals, info="")
        done_before = 0
        for seed, name, cfg in order:
            run_dir = Path(cfg.output_dir)
            check_start(name, cfg, cfgs)
            if _finished(run_dir, cfg.steps):
                bar.console.print(escape(f"{name} seed {seed}: finished earlier, kept"))
            else:
                verb = "resuming" if (run_dir / "grouprl.yaml").is_file() else "training"
                bar.console.print(escape(f"{name} seed {seed}: {verb} ({cfg.algo}) -> {run_dir}"))

                def progress(n: int, base=done_before, label=f"{name} seed {seed}") -> None:
                    bar.update(job, completed=base + n, info=f"{label} step {n}")

                train_run(f"{name} seed {seed}", cfg, progress, nproc)
            done_before += cfg.steps
            bar.update(job, completed=done_before)
        bar.update(job, info="held-out evaluation")
        report = summarise(cfgs, {s.name: s.overrides for s in specs}, out, eval_num, lambda: bar.advance(job))
    write_report(report, cfgs, out)
    return report
