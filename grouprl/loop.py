"""The training loop: rollout -> rewards -> advantages -> update -> log -> checkpoint, written out in order.

`train(cfg)` is the Python API behind `grouprl train`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from grouprl.advantages import zero_std_groups
from grouprl.checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint
from grouprl.config import TrainConfig, config_changes, load_config, save_config
from grouprl.errors import UserError
from grouprl.grpo import GRPO
from grouprl.metrics import MetricsLog, read_metrics
from grouprl.models import load_policy
from grouprl.ppo import PPO
from grouprl.rewards import RewardSet
from grouprl.rollout import Rollout, concat, generate, select
from grouprl.tasks import Task, build_task

LEARNERS = {"grpo": GRPO, "ppo": PPO}  # cfg.algo -> the update, with the models and optimizers it owns


class PromptStream:
    """Training rows in a seeded order, epoch after epoch. Its position (epoch, index) is all a resume needs.
    With `in_order`, the first epoch keeps the task's order (a curriculum); later epochs are shuffled."""

    def __init__(self, rows: list[dict], seed: int, in_order: bool, epoch: int = 0, index: int = 0):
        self.rows, self.seed, self.in_order = rows, seed, in_order
        self.epoch, self.index = epoch, index
        self._order = self._order_for(epoch)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if not (self.in_order and epoch == 0):
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._order_for(self.epoch)
            out.append(self.rows[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


@dataclass
class Scored:
    rollout: Rollout
    rows: list[dict]  # one per sequence
    prompts: list[str]  # one per sequence
    per_fn: torch.Tensor  # (N, K) each reward function
    total: torch.Tensor  # (N,) weighted sum
    zero_std_frac: float  # over every group sampled this step, dropped ones included
    gen_seconds: float = 0.0
    score_seconds: float = 0.0
    generated_tokens: float = 0.0


def columns_of(rows: list[dict]) -> dict:
    """Reward keyword arguments: every column but the prompt, one value per sequence."""
    return {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}


def check_rewards(rewards: RewardSet, task: Task, tokenizer, prefill: str) -> None:
    """Call every reward on two training rows before any work, so a broken function fails fast."""
    rows = (task.train * 2)[:2]
    prompts = [task.chat_prompt(tokenizer, r, prefill) for r in rows]
    completions = [prefill + "\n</reasoning>\n<answer>\n0\n</answer>", prefill]
    rewards.score(prompts, completions, columns_of(rows))


def sample_and_score(policy, tokenizer, task: Task, rewards: RewardSet, stream: PromptStream,
                     cfg: TrainConfig) -> Scored:
    """Generate G completions for prompts_per_step prompts and score them. With dynamic sampling, groups
    whose rewards are all equal are dropped and more prompts are sampled, up to max_sampling_rounds (GRPO)."""
    ro, g = cfg.rollout, cfg.rollout.group_size
    dynamic = cfg.algo == "grpo" and cfg.grpo.dynamic_sampling
    kept: list[Scored] = []
    groups_seen = groups_flat = 0
    n_kept = 0
    t_gen = t_score = tokens = 0.0
    for _ in range(cfg.grpo.max_sampling_rounds if dynamic else 1):
        rows = stream.take(ro.prompts_per_step - n_kept if dynamic else ro.prompts_per_step)
        prompts = [task.chat_prompt(tokenizer, r, cfg.task.prefill) for r in rows]
        t0 = time.perf_counter()
        rollout = generate(policy, tokenizer, prompts, group_size=g, max_new_tokens=ro.max_new_tokens,
                           temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, prefill=cfg.task.prefill)
        t1 = time.perf_counter()
        seq_rows = [rows[i] for i in rollout.prompt_index]
        seq_prompts = [prompts[i] for i in rollout.prompt_index]
        per_fn, total = rewards.score(seq_prompts, rollout.completions, columns_of(seq_rows))
        t_gen += t1 - t0
        t_score += time.perf_counter() - t1
        tokens += rollout.lengths.sum().item()
        flat = zero_std_groups(total, g)  # (B,)
        groups_seen += len(rows)
        groups_flat += int(flat.sum())
        keep = ~flat.repeat_interleave(g) if dynamic else torch.ones(len(total), dtype=torch.bool)
        if keep.any():
            idx = keep.nonzero().flatten()
            kept.append(Scored(select(rollout, keep), [seq_rows[i] for i in idx], [seq_prompts[i] for i in idx],
                               per_fn[keep], total[keep], 0.0))
            n_kept += int(keep.sum()) // g
        if n_kept >= ro.prompts_per_step:
            break
    if not kept:  # every group was flat: train on the last one anyway (zero advantages, only the KL acts)
        kept.append(Scored(rollout, seq_rows, seq_prompts, per_fn, total, 0.0))
    return Scored(
        rollout=concat([k.rollout for k in kept], tokenizer.pad_token_id),
        rows=[r for k in kept for r in k.rows],
        prompts=[p for k in kept for p in k.prompts],
        per_fn=torch.cat([k.per_fn for k in kept]),
        total=torch.cat([k.total for k in kept]),
        zero_std_frac=groups_flat / max(groups_seen, 1),
        gen_seconds=t_gen, score_seconds=t_score, generated_tokens=tokens,
    )


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


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


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of a metrics/completions log up to `last_step` (what a resumed run will write again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in keep))


def train(cfg: TrainConfig, console: Console | None = None, resume: bool = False) -> TrainResult:
    """Train cfg.steps steps. With resume, continue the run in cfg.output_dir from its latest checkpoint
    (weights, optimizers, RNG, data position and logs as they were then), or start it if it has none."""
    console = console or Console()
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {str(out)!r} is a file: expected a folder (new or empty)")
    ckpt = latest_checkpoint(out) if resume else None
    if not resume and ((out / "final").exists() or (out / "metrics.jsonl").exists()
                       or (out / "checkpoints").exists()):
        raise UserError(f"output_dir {str(out)!r} already holds a run: choose another output_dir, or resume it "
                        f"with `grouprl train --resume {out}`")
    changed = config_changes(load_config(ckpt / "grouprl.yaml"), cfg) if ckpt is not None else []
    if changed:  # checked before any model is loaded
        raise UserError(f"cannot resume {str(out)!r} with other settings ({', '.join(changed)}): only "
                        "steps, save_every, save_merged, threads and eval may change")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    task = build_task(cfg.task)
    rewards = RewardSet([(r.name, r.weight) for r in cfg.rewards])
    policy, tokenizer = load_policy(cfg.model)
    check_rewards(rewards, task, tokenizer, cfg.task.prefill)
    learner = LEARNERS[cfg.algo](cfg, policy)
    updates_per_step = cfg.grpo.mu * cfg.grpo.minibatches if cfg.algo == "grpo" else cfg.ppo.epochs * cfg.ppo.minibatches
    in_order = cfg.task.name == "arithmetic" and cfg.task.curriculum
    stream = PromptStream(task.train, cfg.seed, in_order=in_order)
    history: list[dict] = []
    first_step = 1
    if ckpt is not None:
        state, optim_state, rng = load_trainer_state(ckpt)
        k = cfg.grpo.ref_refresh_steps if cfg.algo == "grpo" and cfg.grpo.beta > 0 else 0
        if k and state["step"] % k:
            raise UserError(f"cannot resume exactly after step {state['step']}: the reference was last refreshed "
                            f"at step {state['step'] // k * k} and is not saved; resume from a checkpoint at a "
                            f"multiple of grpo.ref_refresh_steps={k}")
        load_weights(policy, ckpt)
        learner.load(ckpt, optim_state, state)
        if k:
            learner.reference.refresh(policy)  # it was refreshed at exactly this step
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        stream = PromptStream(task.train, cfg.seed, in_order, **state["data"])
        first_step = state["step"] + 1
        history = [m for m in read_metrics(out / "metrics.jsonl") if m["step"] < first_step]
        start -= history[-1]["elapsed"] if history else 0.0
    if resume:  # the steps after the checkpoint (or all, without one) are run again: drop their log lines
        _truncate_jsonl(out / "metrics.jsonl", first_step - 1)
        _truncate_jsonl(out / "completions.jsonl", first_step - 1)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "grouprl.yaml")
    device = next(policy.parameters()).device
    info = {"algo": cfg.algo, "models_trained": learner.models_trained, "models_in_memory": learner.models_in_memory,
            "trainable_parameters": learner.trainable_parameters, "device": str(device)}
    (out / "run_info.json").write_text(json.dumps(info, indent=1))
    log = MetricsLog(out)
    console.print(f"[bold]grouprl[/] {learner.name} on {cfg.task.name} ({len(task.train)} train / {len(task.eval)} "
                  f"held-out problems), model {cfg.model.name_or_path}, {learner.models_trained} model(s) trained, "
                  f"{learner.trainable_parameters:,} trainable parameters, batch {cfg.rollout.prompts_per_step} x "
                  f"G={cfg.rollout.group_size}, {updates_per_step} update(s)/step -> {out}"
                  + (f", resumed after step {first_step - 1}" if ckpt is not None else ""))

    state = {"step": first_step - 1, "data": stream.state(), "seed": cfg.seed, **learner.state()}
    with _progress(console, learner.name) as bar:
        job = bar.add_task("train", total=cfg.steps, completed=first_step - 1, info="")
        for step in range(first_step, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = sample_and_score(policy, tokenizer, task, rewards, stream, cfg)
            t1 = time.perf_counter()
            upd, adv = learner.update(batch.rollout, batch.total, step)
            t2 = time.perf_counter()

            lengths = batch.rollout.lengths
            m = {f"reward/{n}": batch.per_fn[:, k].mean().item() for k, n in enumerate(rewards.names)}
            m |= {f"reward_std/{n}": batch.per_fn[:, k].std().item() for k, n in enumerate(rewards.names)}
            m |= {
                "reward": batch.total.mean().item(), "reward_std": batch.total.std().item(),
                "zero_std_frac": batch.zero_std_frac, **upd,
                "completion_len": lengths.mean().item(), "truncated_frac": batch.rollout.truncated.float().mean().item(),
                "step_time": t2 - t0, "gen_time": batch.gen_seconds,
                "score_time": batch.score_seconds, "update_time": t2 - t1,
                "gen_tokens_per_s": batch.generated_tokens / max(batch.gen_seconds, 1e-9),
                "peak_mem_gib": peak_memory_gib(device), "elapsed": time.perf_counter() - start,
            }
            history.append({"step": step, **m})
            log.log(step, m)
            log.log_completions(step, [
                {"prompt": r["prompt"], "answer": r.get("answer"), "completion": c, "reward": t,
                 "advantage": a, **{n: v for n, v in zip(rewards.names, f)}}
                for r, c, t, a, f in zip(batch.rows, batch.rollout.completions, batch.total.tolist(), adv.tolist(),
                                         batch.per_fn.tolist())
            ])
            fn_means = " ".join(f"{n}={m[f'reward/{n}']:.2f}" for n in rewards.names)
            bar.console.print(f"step {step:>4}  reward {m['reward']:.3f}  {fn_means}  {learner.console(m)}  "
                              f"len {m['completion_len']:.0f}  "
                              f"flat {batch.zero_std_frac:.2f}  {m['step_time']:.1f}s "
                              f"({m['gen_tokens_per_s']:.0f} tok/s)")
            bar.update(job, advance=1, info=f"reward {m['reward']:.2f}")
            state = {"step": step, "data": stream.state(), "seed": cfg.seed, **learner.state()}
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint(out / "checkpoints" / f"step-{step:06d}", policy, tokenizer, cfg, state,
                                learner.optimizer_state(), cfg.save_merged, learner.save_extra)
    final = save_checkpoint(out / "final", policy, tokenizer, cfg, state, learner.optimizer_state(),
                            cfg.save_merged, learner.save_extra)
    log.close()
    result = TrainResult(out, final, history, time.perf_counter() - start)
    console.print(summary_table(result, rewards.names, learner.name))
    return result


def summary_table(result: TrainResult, names: list[str], algo: str = "GRPO") -> Table:
    """First vs last steps (mean of up to 5 each) of every reward, plus speed and where things are."""
    h = result.history
    k = max(1, min(5, len(h) // 2))
    first, last = h[:k], h[-k:]

    def avg(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    table = Table(title=f"{algo} run summary ({len(h)} steps, {result.seconds / 60:.1f} min)")
    table.add_column("metric")
    table.add_column(f"first {k} steps", justify="right")
    table.add_column(f"last {k} steps", justify="right")
    extra = ["explained_var", "value_loss"] if algo == "PPO" else []
    for key in ["reward"] + [f"reward/{n}" for n in names] + ["completion_len", "zero_std_frac", "kl"] + extra:
        table.add_row(key, f"{avg(first, key):.3f}", f"{avg(last, key):.3f}")
    table.add_row("step time (s, median)", "", f"{sorted(r['step_time'] for r in h)[len(h) // 2]:.1f}")
    table.add_row("checkpoint", "", str(result.final_checkpoint))
    return table
