"""grouprl against TRL's GRPOTrainer on the same work: step time, its sampling and update parts, tokens/s, peak memory.

    pip install -e '.[bench]'  # TRL: an optional extra, used only here
    python benchmarks/vs_trl.py [--config configs/default.yaml] [--device cpu|cuda] [--lora|--full] [--steps 6]
                                [--warmup 1] [--rounds 1] [--set key=value ...] [--out docs/results/vs_trl.json]
    python benchmarks/vs_trl.py --smoke  # a tiny random model, a minute; grouprl alone when TRL is missing
    python benchmarks/vs_trl.py --device cuda --shape qwen2.5-0.5b  # a GPU without network: random weights

Every run is a fresh process that trains one system for --warmup + --steps steps, in ABBA order (grouprl, TRL,
TRL, grouprl; --rounds times), so drift in the machine's speed hits both; peak memory is that process's (its
ru_maxrss on the CPU, torch.cuda.max_memory_allocated on CUDA). Both sides read one config through grouprl's
loader: the same model, loaded by grouprl (same dtype and device, same LoRA adapter and initial weights; no
autocast on either side), the same prompts in the same order (chat template and prefill applied by grouprl),
G, completion length, temperature, top-p/k, grouprl's own reward functions with the same weights, advantage
scaling, loss aggregation, clip, beta, mu, AdamW and its schedule, one optimizer step per batch, and the same
micro-batch size and torch threads. What differs is each system's own machinery (sampling engine, update).

Per system, medians over all measured steps of all its runs: the step time, split the same way on both sides
into sampling (generation and the rewards) and update (the rest: the no-grad log-prob forwards, which TRL
runs inside its generation method when beta > 0 or mu > 1, the forward, backward and optimizer step),
completion tokens per second of generation and the mean completion length (sampling is random: a system that
writes longer completions does more work); the peak memory of its largest run; then TRL / grouprl. Prints a
markdown table and writes it with the raw per-step figures to --out. TRL's token count follows its completion
mask, which grpo.mask_truncated=true zeroes for truncated rows (the default, false, counts them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, random_model_folder  # noqa: E402

SYSTEMS = ("grouprl", "trl")
LOSS = {"seq_mean_token_mean": "grpo", "token_mean": "dapo", "constant": "dr_grpo"}  # grouprl -> TRL loss_type
SCALE = {"zscore": "group", "mean": "none", "batch_std": "batch"}  # grouprl advantage -> TRL scale_rewards
SMOKE_SETS = ["rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8",
              "task.num_train=64", "task.num_eval=8"]


def trl_problems(cfg) -> list[str]:
    """Settings TRL's GRPOTrainer has no equivalent for (the A/B would not be the same work)."""
    g = cfg.grpo
    found = {f"algo={cfg.algo}": cfg.algo != "grpo", f"grpo.advantage={g.advantage}": g.advantage not in SCALE,
             "grpo.dynamic_sampling=true": g.dynamic_sampling, f"grpo.minibatches={g.minibatches}": g.minibatches > 1,
             f"grpo.ref_refresh_steps={g.ref_refresh_steps}": g.ref_refresh_steps > 0 and g.beta > 0}
    return [name for name, bad in found.items() if bad]


def peak_gib(cuda: bool) -> float:
    import resource

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def grouprl_child(cfg) -> dict:
    """Train with grouprl's own loop; its metrics.jsonl has the step, update, generation and reward times."""
    import torch

    from grouprl.loop import train

    result = train(cfg)
    counts = Counter(json.loads(line)["step"] for line in (result.output_dir / "completions.jsonl").open())
    steps = [{"step_s": m["step_time"], "gen_s": m["gen_time"], "score_s": m["score_time"],
              "tokens": m["gen_tokens_per_s"] * m["gen_time"],
              "completions": counts[m["step"]], "updated": "loss" in m} for m in result.history]  # no loss: skipped
    return {"steps": steps, "threads": torch.get_num_threads()}


def trl_child(cfg, total: int) -> dict:
    """Train with trl.GRPOTrainer on grouprl's model, prompts and rewards; time each optimizer step with a
    callback and its sampling by wrapping the trainer's generation and reward methods."""
    import torch
    import trl
    from datasets import Dataset
    from rich.console import Console
    from transformers import TrainerCallback

    from grouprl.batch import PromptStream
    from grouprl.loop import _check_inputs
    from grouprl.models import load_policy
    from grouprl.rewards import RewardSet, call_reward
    from grouprl.tasks import build_task

    ro, g, opt = cfg.rollout, cfg.grpo, cfg.optim
    cuda = cfg.model.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # as grouprl's loop does before loading: the same LoRA initialisation
    task = build_task(cfg.task)
    rewards = RewardSet([(r.name, r.weight) for r in cfg.rewards], timeout_s=cfg.rewards_timeout_s)
    task, _ = _check_inputs(cfg, task, rewards, Console(quiet=True))  # grouprl's prompt-length fitting
    policy, tok = load_policy(cfg.model)
    in_order = cfg.task.name == "arithmetic" and cfg.task.curriculum
    rows = PromptStream(task.train, cfg.seed, in_order).take(ro.prompts_per_step * total)  # grouprl's order
    data = Dataset.from_list([{**r, "prompt": task.chat_prompt(tok, r, cfg.task.prefill)} for r in rows])
    columns = [k for k in rows[0] if k != "prompt"]
    same_ids = tok(data[0]["prompt"])["input_ids"] == tok(data[0]["prompt"], add_special_tokens=False)["input_ids"]

    def reward_fn(name, fn):  # grouprl's function behind grouprl's checks; TRL's completions lack the prefill
        def reward(prompts, completions, **kw):
            done = [cfg.task.prefill + c for c in completions]
            return call_reward(name, fn, prompts, done, {k: kw[k] for k in columns}, cfg.rewards_timeout_s)
        reward.__name__ = name.replace("/", "_")
        return reward

    clock = {"generate_and_score_s": 0.0, "gen_s": 0.0, "score_s": 0.0, "tokens": 0, "completions": 0, "longest": 0,
             "optimizer_steps": 0}

    class Timed(trl.GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync()
            lengths = out["completion_mask"].sum(1)
            clock["generate_and_score_s"] += time.perf_counter() - t0
            clock["tokens"] += lengths.sum().item()
            clock["completions"] += len(lengths)
            clock["longest"] = max(clock["longest"], int(lengths.max()))
            return out

        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            clock["gen_s"] += time.perf_counter() - t0
            return out

        def _calculate_rewards(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            clock["score_s"] += time.perf_counter() - t0
            return out

    steps: list[dict] = []

    class Clock(TrainerCallback):  # one optimizer step: begin -> end (the dataloader fetch and logging outside)
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            clock["optimizer_steps"] += 1

        def on_step_end(self, args, state, control, **kw):
            sync()
            steps.append({"step_s": time.perf_counter() - self.t0, **clock})
            clock.update({k: 0 if isinstance(v, int) else 0.0 for k, v in clock.items()})

    micro = max(d for d in range(1, ro.prompts_per_step + 1)  # whole groups per forward, as grouprl's micro-batch
                if ro.prompts_per_step % d == 0 and d <= max(1, g.micro_batch_size // ro.group_size))
    args = trl.GRPOConfig(
        output_dir=str(Path(cfg.output_dir) / "trl"), max_steps=total * g.mu, seed=cfg.seed, use_cpu=not cuda,
        per_device_train_batch_size=micro * ro.group_size, gradient_accumulation_steps=ro.prompts_per_step // micro,
        num_generations=ro.group_size, max_completion_length=ro.max_new_tokens, temperature=ro.temperature,
        top_p=ro.top_p, top_k=ro.top_k, shuffle_dataset=False, reward_weights=[r.weight for r in cfg.rewards],
        scale_rewards=SCALE[g.advantage], loss_type=LOSS[g.loss_agg], importance_sampling_level=g.ratio,
        epsilon=g.eps_low, epsilon_high=g.eps_high, beta=g.beta, num_iterations=g.mu,
        mask_truncated_completions=g.mask_truncated, learning_rate=opt.lr, optim="adamw_torch",
        adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm,
        lr_scheduler_type="constant_with_warmup" if opt.warmup_steps else "constant", warmup_steps=opt.warmup_steps,
        gradient_checkpointing=cfg.model.gradient_checkpointing, bf16=False, fp16=False,  # the model's own dtype
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = Timed(model=policy, reward_funcs=[reward_fn(r.name, f) for r, f in zip(cfg.rewards, rewards.fns)],
                    args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    merged = []  # mu optimizer steps share one generation: together they are one grouprl step
    for k in range(0, len(steps), g.mu):
        part = steps[k:k + g.mu]
        merged.append({key: sum(s[key] for s in part) for key in part[0] if key != "longest"}
                      | {"longest": max(s["longest"] for s in part)})
    for s in merged:
        s["updated"] = True
    first = merged[0]
    print(f"TRL check: {first['completions']} completions in step 1 (expected {ro.prompts_per_step * ro.group_size}), "
          f"the longest {first['longest']} tokens (at most {ro.max_new_tokens}), {first['optimizer_steps']} optimizer "
          f"step(s) (expected {g.mu}), {len(merged)} steps; prompt tokens as grouprl's (no special tokens added): "
          f"{same_ids}; trl {trl.__version__}", flush=True)
    return {"steps": merged, "threads": torch.get_num_threads(), "trl_version": trl.__version__}


def child(a) -> None:
    from grouprl.config import load_config

    cfg = load_config(a.config, a.sets)
    out = grouprl_child(cfg) if a.child == "grouprl" else trl_child(cfg, cfg.steps)
    out["peak_mem_gib"] = peak_gib(cfg.model.device.startswith("cuda"))
    a.result.write_text(json.dumps(out))


def run(system: str, resolved: Path, tmp: Path, n: int) -> dict:
    res, log = tmp / f"{n}-{system}.json", tmp / f"{n}-{system}.log"
    cmd = [sys.executable, __file__, "--child", system, "--config", str(resolved), "--result", str(res),
           "--set", f"output_dir={tmp / f'{n}-{system}'}"]
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    if done.returncode != 0:
        sys.exit(f"the {system} run failed (exit {done.returncode}); the end of its output:\n{text[-4000:]}")
    out = json.loads(res.read_text())
    out["checks"] = [line for line in text.splitlines() if line.startswith("TRL check:")]
    return out


def summarize(runs: list[dict], warmup: int) -> dict:
    steps = [s for r in runs for s in r["steps"][warmup:]]
    for s in steps:  # the same split on both sides: generation + rewards, and everything else
        s["sampling_s"] = s["gen_s"] + s["score_s"]
        s["update_s"] = s["step_s"] - s["sampling_s"]

    def med(f):
        return statistics.median(f(s) for s in steps)
    return {"median_step_s": med(lambda s: s["step_s"]), "sampling_s": med(lambda s: s["sampling_s"]),
            "update_s": med(lambda s: s["update_s"]), "gen_s": med(lambda s: s["gen_s"]),
            "score_s": med(lambda s: s["score_s"]), "tokens_per_s": med(lambda s: s["tokens"] / s["gen_s"]),
            "completion_len": med(lambda s: s["tokens"] / max(s["completions"], 1)),
            "completions_per_step": med(lambda s: s["completions"]),
            "steps_without_update": sum(not s["updated"] for s in steps),  # grouprl skips a batch with no signal
            "peak_mem_gib": max(r["peak_mem_gib"] for r in runs), "threads": runs[0]["threads"],
            "steps_measured": len(steps), "runs": len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value, passed to both systems")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    ap.add_argument("--lora", action="store_true", default=None, help="LoRA as in model.lora (default: the config's)")
    ap.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps per run before the measured ones")
    ap.add_argument("--rounds", type=int, default=1, help="ABBA rounds")
    ap.add_argument("--out", type=Path, default=Path("docs/results/vs_trl.json"))
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 2 prompts x G 4, 8 tokens, 1 + 2 steps")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a model of this published shape with random weights "
                    "(benchmarks/shapes.py), for a machine where no weights can be downloaded")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    import torch

    from grouprl.config import load_config, save_config

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    have_trl = importlib.util.find_spec("trl") is not None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sets = list(a.sets)
        if a.smoke:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from conftest import make_tiny_model

            sets = [f"model.name_or_path={make_tiny_model(tmp / 'tiny')}", *SMOKE_SETS, *sets]
            a.steps, a.warmup, a.rounds = 2, 1, 1
        if a.shape:
            sets.append(f"model.name_or_path={random_model_folder(a.shape, tmp / a.shape)}")
        if a.lora is not None:
            sets.append(f"model.lora.enabled={str(a.lora).lower()}")
        sets += [f"model.device={device}", f"steps={a.warmup + a.steps}", "save_every=0"]
        cfg = load_config(a.config, sets)
        if not have_trl and not a.smoke:
            sys.exit("TRL is not installed: pip install -e '.[bench]' (or pip install trl)")
        if trl_problems(cfg):
            sys.exit(f"no TRL equivalent for {', '.join(trl_problems(cfg))}: not the same work on both sides")
        resolved = tmp / "config.yaml"
        save_config(cfg, resolved)  # both sides load this one file
        systems = list(SYSTEMS) if have_trl else ["grouprl"]
        if not have_trl:
            print("TRL is not installed (pip install -e '.[bench]'): running grouprl alone", flush=True)
        order = [s for _ in range(a.rounds) for s in systems + systems[::-1]] if have_trl else systems * a.rounds
        runs = {s: [] for s in systems}
        for n, system in enumerate(order):
            out = run(system, resolved, tmp, n) | {"round": n // len(systems) // 2 if have_trl else n}
            runs[system].append(out)
            print(f"run {n + 1}/{len(order)} {system}: step times {[round(s['step_s'], 2) for s in out['steps']]} "
                  f"(first {a.warmup} warm-up), peak {out['peak_mem_gib']:.2f} GiB", flush=True)
            for line in out["checks"] if len(runs[system]) == 1 else []:
                print(line, flush=True)
    summary = {s: summarize(r, a.warmup) for s, r in runs.items()}
    mem = "peak memory, max allocated (GiB)" if device == "cuda" else "peak memory, RSS (GiB)"
    table = [f"| system | median step (s) | sampling (s) | update (s) | completion tokens/s | mean completion "
             f"(tokens) | {mem} |", "|---|---|---|---|---|---|---|"]
    for s, m in summary.items():
        table.append(f"| {s} | {m['median_step_s']:.2f} | {m['sampling_s']:.2f} | {m['update_s']:.2f} | "
                     f"{m['tokens_per_s']:.0f} | {m['completion_len']:.1f} | {m['peak_mem_gib']:.2f} |")
    ratio = {}
    if "trl" in summary:
        t, gr = summary["trl"], summary["grouprl"]
        ratio = {k: t[k] / gr[k] for k in ("median_step_s", "sampling_s", "update_s", "peak_mem_gib")}
        table.append(f"| TRL / grouprl | {ratio['median_step_s']:.2f}x | {ratio['sampling_s']:.2f}x | "
                     f"{ratio['update_s']:.2f}x | | | {ratio['peak_mem_gib']:.2f}x |")
    for s, m in summary.items():
        if m["steps_without_update"]:
            table.append(f"\n{s}: {m['steps_without_update']} of {m['steps_measured']} measured steps had every group's "
                         "rewards equal and ran no update (grouprl skips such a batch; TRL runs it)")
    print("\n".join(table))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"model": cfg.model.name_or_path, "lora": cfg.model.lora.model_dump() if cfg.model.lora.enabled else None,
                "prompts_per_step": cfg.rollout.prompts_per_step, "group_size": cfg.rollout.group_size,
                "max_new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.rollout.temperature,
                "lr": cfg.optim.lr, "beta": cfg.grpo.beta, "mu": cfg.grpo.mu, "advantage": cfg.grpo.advantage,
                "loss_agg": cfg.grpo.loss_agg, "rewards": [r.model_dump() for r in cfg.rewards]}
    a.out.write_text(json.dumps({
        "command": " ".join(sys.argv), "config": a.config, "sets": a.sets, "device": device, "smoke": a.smoke,
        "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "order": order, "settings": settings,
        "torch": torch.__version__, "trl": next((r.get("trl_version") for r in runs.get("trl", [])), None),
        "trl_missing": not have_trl, "summary": summary, "ratio_trl_over_grouprl": ratio, "table": table,
        "raw": runs}, indent=1))


if __name__ == "__main__":
    main()
