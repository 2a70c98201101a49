"""The training loop: rollout -> rewards -> advantages -> update -> log -> checkpoint, written out in order.

`train(cfg)` is the Python API behind `grouprl train`. It knows nothing of any one algorithm: it asks its
`Learner` (learner.py). Before any model is loaded it checks what can be checked (data, prompt lengths,
reward functions, the output folder and its lock); while it runs, a SIGINT/SIGTERM ends it after the
current step with a checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from grouprl import engines
from grouprl.batch import PromptStream, Scored, check_rewards, sample_and_score
from grouprl.checkpoint import (checkpoint_step, clean_leftovers, complete_checkpoints, latest_checkpoint,
                                load_trainer_state, load_weights, prune_checkpoints, save_checkpoint)
from grouprl.config import (RESUMABLE_CHANGES, TrainConfig, config_changes, load_config, save_config,
                            world_problems)
from grouprl.distributed import (agree, any_rank, first_line, gather_objects, init, is_fsdp, is_main, load_trained, pick_strategy,
                                 rank, sum_floats, unwrap, world_size)
from grouprl.errors import Stopped, UserError
from grouprl.episodes import Setup, setup as episodes_setup
from grouprl.evaluate import evaluate_while_training
from grouprl.trackers import check as check_trackers
from grouprl.grpo import GRPO
from grouprl.guard import LOCK_FILE, RunLock, StopSignals, refuse_links, reward_files, write_atomic
from grouprl.learner import Learner, probe_memory
from grouprl.rollout import Rollout
from grouprl.logprobs import PASSES, attention
from grouprl.metrics import MetricsLog, Silent, read_metrics, truncate_jsonl
from grouprl.models import context_length, load_policy, load_tokenizer, resolve_model_path
from grouprl.ppo import PPO
from grouprl.rewards import RewardSet
from grouprl import sft
from grouprl.tasks import Task, build_task, default_max_prompt_tokens, fit_prompts

LEARNERS = {"grpo": GRPO, "ppo": PPO, "sft": sft.SFT}  # cfg.algo -> the update, with the models and optimizers it owns


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    best_checkpoint: Path | None = None  # eval_every: the checkpoint with the best held-out accuracy


def _progress(console: Console, name: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: max allocated on CUDA, the resident set size (ru_maxrss) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _resume_point(out: Path, cfg: TrainConfig, code: dict[str, str], console: Console) -> Path | None:
    """Tidy a run folder after a kill and return its latest complete checkpoint (None: start from step 1).
    Refuses changed settings and checkpoints that cannot be resumed exactly; names the reward code that
    will be imported (`code`: file -> sha256 now) and warns when it changed since the checkpoint was written.
    Loads no model."""
    for p in clean_leftovers(out):
        console.print(f"[yellow]removed[/] {escape(str(p))} (an unfinished checkpoint write)")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    changed = config_changes(load_config(ckpt / "grouprl.yaml"), cfg)
    if changed:
        raise UserError(f"cannot resume {str(out)!r} with other settings ({', '.join(changed)}): only "
                        f"{', '.join(sorted(RESUMABLE_CHANGES - {'output_dir'}))} may change, and the section of "
                        "the algorithm the run does not use")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if not isinstance(state, dict) or type(state.get("step")) is not int:
            raise ValueError("trainer_state.json holds no step")
        named = int(ckpt.name.removeprefix("step-")) if ckpt.name != "final" else checkpoint_step(ckpt)
        if not 0 <= state["step"] == checkpoint_step(ckpt) == named:
            raise ValueError(f"trainer_state.json says step {state['step']}, its folder and marker say {named} "
                             f"and {checkpoint_step(ckpt)}")
        data = state.get("data")
        if not (isinstance(data, dict) and set(data) == {"epoch", "index"}
                and all(type(v) is int and v >= 0 for v in data.values())):
            raise ValueError("trainer_state.json's data position is not {epoch, index}, whole numbers >= 0")
    except (OSError, ValueError, RecursionError) as e:
        raise damaged(ckpt, e) from None
    if state["step"] > cfg.steps:
        raise UserError(f"{str(out)!r} is already at step {state['step']}: set steps to at least that to resume "
                        f"it (got steps={cfg.steps})")
    problem = LEARNERS[cfg.algo].resume_problem(cfg, state["step"])
    if problem:
        raise UserError(problem)
    then = state.get("reward_files", {})
    if code:
        console.print(escape(f"resuming imports reward code from: {', '.join(code)}"))
    for path, digest in code.items():
        if then.get(path) != digest:
            console.print(f"[yellow]warning:[/] reward file {escape(path)} changed since {ckpt.name} was saved: the "
                          "resumed steps will not repeat the run's rewards exactly")
    return ckpt


def damaged(ckpt: Path, err: BaseException) -> UserError:
    """The one line for a committed checkpoint that cannot be read back, pointing at the one before it."""
    found = [p for _, p in complete_checkpoints(ckpt.parent.parent if ckpt.name != "final" else ckpt.parent)]
    before = found[found.index(ckpt) - 1] if ckpt in found and found.index(ckpt) > 0 else None
    hint = f"move it aside to resume from {before}" if before else "no earlier checkpoint to fall back on"
    inner = next(iter(getattr(err, "failures", {}).values()), (err,))[0]  # DCP wraps the reading error
    return UserError(f"checkpoint {str(ckpt)!r} is damaged ({type(inner).__name__}: {first_line(err)}): {hint}")


def _refuse(problems: list[str]) -> None:
    if problems:
        raise UserError(problems[0])


def _restore(ckpt: Path, learner: Learner) -> dict:
    """Put a checkpoint's trained weights, optimizers, schedulers, learner state and this rank's RNG back;
    returns its trainer state. dcp/ is read at any world size and strategy; a checkpoint written before
    dcp/ existed (HF-layout weights and optimizer.pt) only where every rank holds the whole model.
    Each rank first reads its own files, and all agree before the collective read of dcp/."""
    from torch.distributed.checkpoint import CheckpointException  # (a BaseException)

    error = None
    try:
        state, optim_state, rng = load_trainer_state(ckpt)
    except Exception as e:  # a file damaged after it was committed (a disk fault, a hand edit)
        error = str(damaged(ckpt, e))
    agree(error)
    try:
        parts = learner.trained()
        if (ckpt / "dcp").is_dir():
            load_trained({name: (m, o.optimizer) for name, (m, o) in parts.items()}, ckpt / "dcp",
                         state.get("optimizers_stepped", list(parts)))
            for name, (_, o) in parts.items():
                o.scheduler.load_state_dict(state["schedulers"][name])
        elif any(is_fsdp(m) for m, _ in parts.values()):
            raise UserError(f"{str(ckpt)!r} was written before sharded checkpoints: resume it once with "
                            "distributed.strategy=ddp (or in one process) to write one FSDP2 can read")
        else:
            load_weights(unwrap(learner.policy), ckpt)
            learner.load_legacy(ckpt, optim_state)
        learner.load(state)
    except UserError:
        raise
    except (Exception, CheckpointException) as e:
        raise damaged(ckpt, e) from None
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        cuda = rng["cuda"]  # one process: every device's (a list); a rank: its own device's
        if isinstance(cuda, list) and world_size() == 1:
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list) else cuda)
    return state


def _check_inputs(cfg: TrainConfig, task: Task, rewards: RewardSet, console: Console) -> tuple[Task, Setup | None]:
    """Everything about the data, the environment and the rewards that can be checked with the tokenizer
    alone, before any model is loaded: the environment on a training row and the chat template across turns,
    prompt lengths (every row; returns the task with over-long prompts cut or dropped when so configured, and
    its tools), the batch size against the data, and one call of every reward function."""
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    env = None
    if cfg.env.name:
        env, task = episodes_setup(cfg.env, tokenizer, task)
        for fallback in env.chat.fallbacks:
            console.print(f"environment {cfg.env.name}: {fallback}")
    limit = cfg.task.max_prompt_tokens or default_max_prompt_tokens(
        context_length(path, cfg.model.trust_remote_code), cfg.rollout.max_new_tokens)
    fitted = fit_prompts(task, tokenizer, cfg.task.prefill, limit, cfg.task.long_prompts)
    if len(fitted.train) < len(task.train) or len(fitted.eval) < len(task.eval):
        console.print(f"dropped {len(task.train) - len(fitted.train)} train and {len(task.eval) - len(fitted.eval)} "
                      f"held-out rows over task.max_prompt_tokens={limit}")
    task = fitted
    if cfg.rollout.prompts_per_step > len(task.train):
        raise UserError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} is more than the "
                        f"{len(task.train)} training prompts: lower it or add data")
    reserved = sorted(({"prompts", "completions", "completion_ids"} | ({"episode"} if env else set()))
                      & set(task.train[0]))
    if reserved:
        raise UserError(f"the data has column(s) {reserved}, names that reward functions receive as arguments: "
                        "rename them")
    check_rewards(rewards, task, tokenizer, cfg.task.prefill, episodes=env is not None)
    return task, env


def train(cfg: TrainConfig, console: Console | None = None, resume: bool = False) -> TrainResult:
    """Train cfg.steps steps. With resume, continue the run in cfg.output_dir from its latest checkpoint
    (weights, optimizers, RNG, data position and logs as they were then), or start it if it has none.

    Raises UserError for bad input (before any model is loaded where it can be checked without one) and
    Stopped after a SIGINT/SIGTERM, once the step in progress is done and saved."""
    init(cfg.distributed.timeout_s)
    console = console or Console()
    if not is_main():
        console = Console(quiet=True)  # rank 0 alone prints
    start = time.perf_counter()
    out = Path(cfg.output_dir).absolute()  # fixed now: user code that changes the working directory cannot move it
    locks: list[RunLock] = []
    try:
        together(lambda: _check_output_dir(out, resume), main_only=True)
        if resume:  # a new run's lock: once its input is good
            together(lambda: locks.append(RunLock(out).acquire()), main_only=True)
        with StopSignals(same_request_s=2.0 if world_size() > 1 else 0.0, announce=is_main()) as stop:
            steps = sft.run if cfg.algo == "sft" else _train  # SFT reads examples, not rollouts: steps of its own
            return steps(cfg, console, out, start, locks, stop, resume)
    finally:
        for lock in locks:  # a start that failed before writing anything leaves no folder behind
            lock.release(remove_empty_folder=True)


def _check_output_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {str(out)!r} is a file: expected a folder (new or empty)")
    if out.is_dir():
        refuse_links(out)
    if not resume and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        held = any((out / f).exists() for f in ("final", "checkpoints", "metrics.jsonl", "grouprl.yaml"))
        raise UserError(f"output_dir {str(out)!r} already holds a run: choose another output_dir, or resume it with "
                        f"`grouprl train --resume {out}`" if held else f"output_dir {str(out)!r} is not empty: "
                        "expected a new or empty folder (a run writes several files and folders into it)")


def together(fn, main_only: bool = False):
    """Run fn on every rank (or on rank 0 only, its result sent to all): a UserError on any rank is raised
    as the same UserError on every rank, so none is left waiting in a collective. One process: fn()."""
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_main() or not main_only:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    agree(error)
    return gather_objects(result)[0] if main_only else result


def _train(cfg: TrainConfig, console: Console, out: Path, start: float, locks: list[RunLock], stop: StopSignals,
           resume: bool) -> TrainResult:
    code = reward_files([r.name for r in cfg.rewards] + [cfg.env.name or ""])  # hashed before any is imported
    ckpt = together(lambda: _resume_point(out, cfg, code, console), main_only=True) if resume else None
    world = world_size()
    together(lambda: _refuse(world_problems(cfg, world, cfg.distributed.strategy)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every rank: LoRA and value heads start identical

    task = build_task(cfg.task)
    specs = [(r.name, r.weight) for r in cfg.rewards]
    if cfg.env.name and "env" not in [n for n, _ in specs]:
        specs.append(("env", 1.0))  # the environment's own reward
    rewards = RewardSet(specs, timeout_s=cfg.rewards_timeout_s, workers=cfg.reward_workers)
    try:
        return _train_with(cfg, console, out, start, locks, stop, resume, code, ckpt, world, task, rewards)
    finally:
        rewards.close()


def _train_with(cfg: TrainConfig, console: Console, out: Path, start: float, locks: list[RunLock], stop: StopSignals,
                resume: bool, code, ckpt, world: int, task: Task, rewards: RewardSet) -> TrainResult:
    task, env = together(lambda: _check_inputs(cfg, task, rewards, console))
    together(lambda: check_trackers(cfg.report_to), main_only=True)
    if not resume:  # (a resume took it before anything else)
        together(lambda: locks.append(RunLock(out).acquire()), main_only=True)
    policy, tokenizer = together(lambda: load_policy(cfg.model))
    device = next(policy.parameters()).device
    if world > 1:
        strategy = pick_strategy(cfg.distributed.strategy, policy, device)
        together(lambda: _refuse(world_problems(cfg, world, strategy)))
        cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"strategy": strategy})})
    learner: Learner = LEARNERS[cfg.algo](cfg, policy)
    if world > 1:
        torch.manual_seed(cfg.seed + rank())  # dropout differs between ranks as between sequences
    in_order = cfg.task.name == "arithmetic" and cfg.task.curriculum
    stream = PromptStream(task.train, cfg.seed, in_order=in_order)
    history: list[dict] = []
    first_step = 1
    if ckpt is not None:
        state = together(lambda: _restore(ckpt, learner))
        if state["data"]["index"] > len(task.train):  # (a checkpoint of this data cannot be past its end)
            together(lambda: _refuse([str(damaged(ckpt, ValueError(
                f"its data position {state['data']['index']} is past the {len(task.train)} training rows")))]))
        stream = PromptStream(task.train, cfg.seed, in_order, **state["data"])
        first_step = state["step"] + 1
        history = [m for m in read_metrics(out / "metrics.jsonl") if m["step"] < first_step]
        start -= history[-1].get("elapsed", 0.0) if history else 0.0  # (read_metrics: numbers)
    best = best_eval(history)  # (accuracy, step) of the best evaluation so far, or None
    if resume and is_main():  # the steps after the checkpoint (or all, without one) are run again: drop their logs
        truncate_jsonl(out / "metrics.jsonl", first_step - 1)
        truncate_jsonl(out / "completions.jsonl", first_step - 1)
    info = {"algo": cfg.algo, "models_trained": learner.models_trained, "models_in_memory": learner.models_in_memory,
            "trainable_parameters": learner.trainable_parameters, "device": str(device), "world_size": world,
            "strategy": cfg.distributed.strategy if world > 1 else None}
    if is_main():
        save_config(cfg, out / "grouprl.yaml")
        write_atomic(out / "run_info.json", json.dumps(info, indent=1))
    log = MetricsLog(out, cfg.report_to, cfg.model_dump(mode="json"), cfg.project, cfg.run_name) if is_main() \
        else Silent()
    about = (f"{learner.name} on {cfg.task.name} ({len(task.train)} train / {len(task.eval)} held-out problems), "
             f"model {cfg.model.name_or_path}, {learner.models_trained} model(s) trained, "
             f"{learner.trainable_parameters:,} trainable parameters, batch {cfg.rollout.prompts_per_step} x "
             f"G={cfg.rollout.group_size}"
             + (f" on {world} ranks ({cfg.distributed.strategy}, {device.type})" if world > 1 else "")
             + f" -> {out}" + (f", resumed after step {first_step - 1}" if ckpt is not None else ""))
    console.print(f"[bold]grouprl[/] {escape(about)}")
    attn = attention(learner.policy)
    console.print(f"rollout engine: {engines.pick(cfg.rollout.engine, device)}"
                  + (" (auto)" if cfg.rollout.engine == "auto" else "") + (f", attention: {attn}" if attn else "")
                  + f", update layout: {learner.layout}" + (" (auto)" if cfg.model.update_layout == "auto" else ""))

    def checkpoint(path: Path, step: int) -> Path:
        state = {"step": step, "data": stream.state(), "seed": cfg.seed, "reward_files": code, **learner.state()}
        log.sync()  # the logs reach the disk before the checkpoint that they must not lag behind
        return save_checkpoint(path, learner.policy, tokenizer, cfg, state, learner.trained(), cfg.save_merged,
                               learner.export)

    if cfg.memory_probe is True or (cfg.memory_probe == "auto" and device.type == "cuda"):
        _probe(cfg, learner, tokenizer, task, device, console)
    bad_streak = 0
    try:
        with _progress(console, learner.name) as bar:
            job = bar.add_task("train", total=cfg.steps, completed=first_step - 1, info="")
            for step in range(first_step, cfg.steps + 1):
                if step == first_step and any_rank(bool(stop.requested), device):
                    raise Stopped(f"stopped by {stop.requested or 'another rank'} before step {step}: nothing new to save; start "
                                  f"again with: grouprl train --resume {out}")
                t0 = time.perf_counter()
                PASSES.reset()
                batch = sample_and_score(policy, tokenizer, task, rewards, stream, cfg, step, device,
                                         learner.resamples_flat_groups, learner.max_sampling_rounds, env)
                t1 = time.perf_counter()
                upd, adv = learner.update(batch.rollout, batch.total, step)
                t2 = time.perf_counter()
                m = step_metrics(batch, rewards.names, upd) | {
                    "step_time": t2 - t0, "update_time": t2 - t1, "elapsed": time.perf_counter() - start}
                m |= sum_floats({"passes_forward": PASSES.forward, "passes_backward": PASSES.backward}, device)
                peaks = gather_objects(peak_memory_gib(device))
                m |= {"peak_mem_gib": peaks[0]} | ({"peak_mem_gib_max": max(peaks)} if world > 1 else {})
                evaluated = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
                if evaluated:
                    ev = evaluate_while_training(policy, tokenizer, task, cfg, step, device, env)
                    m |= {f"eval/{k}": v for k, v in ev.items() if k not in ("problems", "seconds")}
                    m |= {"eval_time": ev["seconds"], "elapsed": time.perf_counter() - start}
                history.append({"step": step, **m})
                log.log(step, m)
                if step % cfg.log_completions_every == 0:
                    eps = batch.episodes or [None] * len(batch.rows)
                    log.log_completions(step, [
                        {"prompt": r["prompt"], "answer": r.get("answer"), "completion": c, "reward": t,
                         "advantage": a, **{n: v for n, v in zip(rewards.names, f)},
                         **(e.summary() if e is not None else {})}
                        for r, c, t, a, f, e in zip(batch.rows, batch.rollout.completions, batch.total.tolist(),
                                                    adv.tolist(), batch.per_fn.tolist(), eps)
                    ], cfg.rollout.group_size)
                fn_means = " ".join(f"{n}={m[f'reward/{n}']:.2f}" for n in rewards.names)
                fn_means = escape(fn_means)  # reward names are the user's: 'x[1].py:f' is not markup
                bar.console.print(f"step {step:>4}  reward {m['reward']:.3f}  {fn_means}  {learner.console(m)}  "
                                  f"len {m['completion_len']:.0f}  flat {batch.zero_std_frac:.2f}  "
                                  f"{m['step_time']:.1f}s "
                                  f"({m['gen_tokens_per_s']:.0f} tok/s)")
                if evaluated:
                    better = best is None or m["eval/accuracy"] >= best[0]  # ties: the later
                    best = (m["eval/accuracy"], step) if better else best
                    if better:
                        checkpoint(out / "best", step)
                    bar.console.print(f"eval {step:>4}  held-out accuracy {m['eval/accuracy']:.1%}  format "
                                      f"{m['eval/format_rate']:.1%}" + "".join(
                                          f"  {k.removeprefix('eval/')} {v:.1%}" for k, v in m.items()
                                          if k.startswith(("eval/pass@", "eval/maj@")))
                                      + f"  ({ev['problems']} problems, {ev['seconds']:.0f}s)  best "
                                      f"{best[0]:.1%} at step {best[1]}" + ("  -> best/" if better else ""))
                if m.get("oom_backoffs"):
                    bar.console.print(f"[yellow]warning:[/] step {step}: out of memory; the micro-batch budget was halved "
                                      f"{m['oom_backoffs']:.0f} time(s) to {m['micro_batch_tokens']:.0f} tokens and the "
                                      "work redone with it (same result); kept for the rest of the run")
                bar.update(job, advance=1, info=f"reward {m['reward']:.2f}")
                bad_streak = bad_streak + 1 if upd.get("nonfinite_steps") else 0
                if bad_streak:
                    bar.console.print(f"[yellow]warning:[/] step {step}: a non-finite loss or gradient norm; "
                                      f"{upd['nonfinite_steps']} optimizer step(s) skipped")
                if bad_streak >= cfg.max_nonfinite_steps:  # the same count on every rank (all-reduced)
                    last = latest_checkpoint(out)
                    err = UserError(f"{bad_streak} steps in a row had a non-finite loss or gradient norm (up to step "
                                    f"{step}): stopped; the last good checkpoint is {last or 'none'}. Lower optim.lr, "
                                    "check the rewards' scale, or use float32")
                    err.everywhere = True  # the streak is counted from all-reduced flags: every rank stops here
                    raise err
                if step == cfg.steps:
                    break
                stopping = any_rank(bool(stop.requested), device)  # every rank stops after the same step
                if stopping or (cfg.save_every and step % cfg.save_every == 0):
                    saved = checkpoint(out / "checkpoints" / f"step-{step:06d}", step)
                    if is_main():
                        prune_checkpoints(out, cfg.save_total_limit)
                if stopping:
                    raise Stopped(f"stopped by {stop.requested or 'another rank'} after step {step}; saved {saved}. "
                                  "Resume with: "
                                  f"grouprl train --resume {out}")
        final = checkpoint(out / "final", cfg.steps)
    finally:
        log.close()  # flushed and closed however the loop ends (a stop, an error)
    result = TrainResult(out, final, history, time.perf_counter() - start,
                         out / "best" if best is not None else None)
    console.print(summary_table(result, rewards.names, learner))
    return result


def _probe(cfg: TrainConfig, learner: Learner, tokenizer, task: Task, device: torch.device, console: Console) -> None:
    """memory_probe: the update's forward and backward on the longest batch the run can meet (the longest
    prompt, every completion max_new_tokens long), before step 1 (see learner.probe_memory)."""
    from grouprl.tasks import token_lengths

    texts = [task.chat_prompt(tokenizer, r, cfg.task.prefill) for r in task.train]
    longest = texts[max(range(len(texts)), key=token_lengths(tokenizer, texts).__getitem__)]
    ids = tokenizer(longest, add_special_tokens=False, return_tensors="pt").input_ids.to(device)  # (1, P)
    g, n = cfg.rollout.group_size, cfg.rollout.prompts_per_step * cfg.rollout.group_size
    c = cfg.rollout.max_new_tokens
    completion = ids[:, -1:].repeat(n, c)  # any tokens: only the shape matters
    rollout = Rollout(input_ids=torch.cat([ids.repeat(n, 1), completion], 1),
                      attention_mask=torch.ones(n, ids.shape[1] + c, dtype=torch.long, device=device),
                      completion_mask=torch.ones(n, c, device=device), truncated=torch.ones(n, dtype=torch.bool),
                      completions=[""] * n, prompt_index=[i // g for i in range(n)], group_size=g,
                      temperature=cfg.rollout.temperature)
    micro = cfg.grpo.micro_batch_size if cfg.algo == "grpo" else cfg.ppo.micro_batch_size
    budget = learner.budget
    before = budget.tokens
    probe_memory(learner.policy, rollout, budget, max(1, micro // g), learner.layout, cfg.entropy.coef > 0)
    budget.backoffs = 0  # said here, not as step 1's
    if budget.tokens != before:
        console.print(f"[yellow]memory probe:[/] out of memory on the longest batch ({ids.shape[1]} prompt + {c} "
                      f"completion tokens); micro-batches now hold at most {budget.tokens} tokens")


def best_eval(history: list[dict]) -> tuple[float, int] | None:
    """(held-out accuracy, step) of the best evaluation in the log, the later of equals; None before any."""
    best = None
    for row in history:
        if "eval/accuracy" in row and (best is None or row["eval/accuracy"] >= best[0]):
            best = (row["eval/accuracy"], row["step"])
    return best


def step_metrics(batch: Scored, names: list[str], update: dict[str, float]) -> dict[str, float]:
    """The metrics of one step that come from its batch, plus the learner's own."""
    lengths = batch.rollout.lengths
    m = {f"reward/{n}": batch.per_fn[:, k].mean().item() for k, n in enumerate(names)}
    m |= {f"reward_std/{n}": batch.per_fn[:, k].std().item() for k, n in enumerate(names)}
    return m | {
        "reward": batch.total.mean().item(), "reward_std": batch.total.std().item(),
        "zero_std_frac": batch.zero_std_frac, **update,
        "completion_len": lengths.mean().item(), "truncated_frac": batch.rollout.truncated.float().mean().item(),
        "gen_time": batch.gen_seconds, "score_time": batch.score_seconds,
        "gen_tokens_per_s": batch.generated_tokens / max(batch.gen_seconds, 1e-9),
        "passes_sample": batch.sample_passes,  # token-passes (see logprobs.TokenPasses): sampling's, all ranks
    } | (episode_metrics(batch.episodes) if batch.episodes is not None else {})


def episode_metrics(episodes: list) -> dict[str, float]:
    """Per step, with an environment: turns, tool calls and tokens per turn (means over episodes), the shares of
    episodes that call a tool and that check their answer with a further call (verification.tool_checked),
    tool errors per episode, and by kind, replies cut and failed episodes (counts)."""
    from grouprl.envs.calls import ERRORS
    from grouprl.verification import tool_checked

    n, turns = len(episodes), sum(e.turns for e in episodes)
    return {"episode/turns": turns / n, "episode/tool_calls": sum(e.tool_calls for e in episodes) / n,
            "episode/tool_rate": sum(e.tool_calls > 0 for e in episodes) / n,
            "episode/tool_errors": sum(sum(e.errors.values()) for e in episodes) / n,
            "episode/tokens_per_turn": sum(sum(e.turn_tokens) for e in episodes) / max(turns, 1),
            "episode/tool_checked": sum(tool_checked(e.messages) for e in episodes) / n,
            "episode/replies_cut": float(sum(e.replies_cut for e in episodes)),
            "episode/failed": float(sum(e.failed is not None for e in episodes)),
            "episode/env_reward": sum(e.reward for e in episodes) / n,
            **{f"tool_errors/{k}": float(sum(e.errors[k] for e in episodes)) for k in ERRORS}}


def summary_table(result: TrainResult, names: list[str], learner: Learner) -> Table:
    """First vs last steps (mean of up to 5 each) of every reward, plus speed and where things are."""
    h = result.history
    k = max(1, min(5, len(h) // 2))
    first, last = h[:k], h[-k:]

    def avg(rows, key):  # steps without an update have no loss, kl, ...
        have = [r[key] for r in rows if key in r]
        return f"{sum(have) / len(have):.3f}" if have else "-"

    table = Table(title=f"{learner.name} run summary ({len(h)} steps, {result.seconds / 60:.1f} min)")
    table.add_column("metric")
    table.add_column(f"first {k} steps", justify="right")
    table.add_column(f"last {k} steps", justify="right")
    for key in ["reward"] + [f"reward/{n}" for n in names] + ["completion_len", "zero_std_frac"] + learner.summary_keys:
        table.add_row(escape(key), avg(first, key), avg(last, key))
    evals = [r for r in h if "eval/accuracy" in r]
    if evals:
        best = best_eval(h)
        table.add_row("held-out accuracy", f"{evals[0]['eval/accuracy']:.3f} (step {evals[0]['step']})",
                      f"{evals[-1]['eval/accuracy']:.3f} (best {best[0]:.3f}, step {best[1]})")
    table.add_row("step time (s, median)", "", f"{sorted(r['step_time'] for r in h)[len(h) // 2]:.1f}")
    table.add_row("checkpoint", "", escape(str(result.final_checkpoint)))
    if result.best_checkpoint is not None:
        table.add_row("best checkpoint (held-out)", "", escape(str(result.best_checkpoint)))
    return table
