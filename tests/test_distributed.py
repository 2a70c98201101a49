"""Data parallel under torchrun, on the CPU with 2 gloo processes: a step at world size 2 equals the step of one
process on the same global batch (DDP and FSDP2, full fine-tuning and LoRA, every GRPO aggregation, dynamic
sampling, PPO with a separate critic and with a value head); resumes across world sizes; one line and a
bounded exit when a rank fails.

The whole world-size-2 side runs as one torchrun job (tests/dist_worker.py) to pay the start-up once.
Sampling is seeded per prompt (batch.sampling_seed), so both sides draw the same completions and the
comparison covers three steps, not just one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from grouprl.config import load_config, save_config
from grouprl.loop import train
from grouprl.metrics import read_jsonl
from test_learning import toy_config

STEPS = 3
BASE = {"steps": STEPS, "save_every": 1, "threads": 1, "rollout.group_size": 4, "rollout.prompts_per_step": 4,
        "rollout.max_new_tokens": 8, "grpo.micro_batch_size": 4, "ppo.micro_batch_size": 4}
CASES = {  # name -> settings; every run is compared with the same settings in one process
    "ddp-full-seqmean": {"distributed.strategy": "ddp", "grpo.beta": 0.04, "grpo.loss_agg": "seq_mean_token_mean"},
    "ddp-lora-tokenmean": {"distributed.strategy": "ddp", "model.lora.enabled": True, "grpo.beta": 0.04,
                           "grpo.loss_agg": "token_mean", "optim.lr": 1e-2},
    "fsdp-full-constant": {"distributed.strategy": "fsdp2", "grpo.loss_agg": "constant", "grpo.mu": 2,
                           "grpo.minibatches": 2, "grpo.advantage": "batch_std"},
    "fsdp-lora-seqmean": {"distributed.strategy": "fsdp2", "model.lora.enabled": True, "grpo.beta": 0.04,
                          "grpo.advantage": "rloo", "optim.lr": 1e-2},
    "fsdp-full-checkpointed": {"distributed.strategy": "fsdp2", "model.gradient_checkpointing": True,
                               "grpo.beta": 0.04, "grpo.advantage": "rank", "grpo.ref_refresh_steps": 1},
    "ddp-dynamic": {"distributed.strategy": "ddp", "grpo.dynamic_sampling": True, "grpo.max_sampling_rounds": 3,
                    "grpo.loss_agg": "token_mean", "rewards": "HAS_A"},
    "ppo-ddp-separate": {"algo": "ppo", "distributed.strategy": "ddp", "ppo.kl_target": 0.01, "ppo.epochs": 2,
                         "ppo.minibatches": 2},
    "ppo-fsdp-head": {"algo": "ppo", "distributed.strategy": "fsdp2", "ppo.critic.kind": "head", "ppo.epochs": 2},
    "ppo-ddp-lora": {"algo": "ppo", "distributed.strategy": "ddp", "model.lora.enabled": True, "optim.lr": 1e-2,
                     "ppo.kl_coef": 0.05},  # a LoRA critic of its own, the adapter-off reference
    # issue 12: a token budget, held-out evaluation shared out over ranks, entropy bonus and Clip-Cov
    "ddp-budget-eval-clipcov": {"distributed.strategy": "ddp", "max_tokens_per_micro_batch": 250, "eval_every": 2,
                                "eval.num_problems": 6, "eval.batch_size": 4, "entropy.coef": 0.01,
                                "entropy.remedy": "clip_cov", "entropy.cov_ratio": 0.1,
                                "entropy.clip_cov_bounds": "[-100, 100]"},
    "ppo-fsdp-klcov": {"algo": "ppo", "distributed.strategy": "fsdp2", "ppo.epochs": 2, "entropy.remedy": "kl_cov",
                       "entropy.cov_ratio": 0.1, "max_tokens_per_micro_batch": 250},
}
MATCH = ["reward", "loss", "grad_norm", "kl", "entropy", "clip_frac", "ratio", "completion_len", "zero_std_frac",
         "value_loss", "explained_var", "critic_grad_norm", "kl_coef", "approx_kl", "entropy_remedied",
         "micro_batch_tokens", "eval/accuracy", "eval/format_rate", "eval/mean_length_chars"]


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Two ranks, on a free port (--standalone): not torchrun's fixed 29500, which another job may hold."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    f = folder / "model.safetensors"
    return load_file(f if f.is_file() else folder / "adapter_model.safetensors")


def assert_same_weights(a: Path, b: Path, start: Path | None) -> None:
    """Equal up to float rounding: |a - b| is below 1% of the largest update (|a - start|; under LoRA, whose
    B matrices start at zero, the largest |B|) and below 3e-5 (AdamW divides by sqrt(v), so a gradient of
    rounding size can move a weight by up to lr)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    lora_b = [k for k in wa if "lora_B" in k]
    moved = None
    if start is not None:
        w0 = weights(start)
        moved = max((wa[k] - w0[k]).abs().max().item() for k in wa if k in w0)
    elif lora_b:
        moved = max(wa[k].abs().max().item() for k in lora_b)
    if moved is not None:
        assert moved > 1e-4, moved  # it did train
        assert diff < 0.01 * moved, (diff, moved)
    assert diff < 3e-5, diff


def assert_same_metrics(a: Path, b: Path) -> None:
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, STEPS + 1))
    for x, y in zip(ma, mb):
        for k in MATCH:
            assert (k in x) == (k in y), k
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k, x[k], y[k])
    ca = [c["completion"] for c in read_jsonl(a / "completions.jsonl")]
    assert ca == [c["completion"] for c in read_jsonl(b / "completions.jsonl")]  # every rank's rows, in order


@pytest.fixture(scope="module")
def setup(tiny_model, toy_data, toy_reward, tmp_path_factory):
    """Configs for every case, the whole world-size-2 side run as one torchrun job, and its output folders."""
    tmp = tmp_path_factory.mktemp("dist")
    has_a = tmp / "has_a.py"
    has_a.write_text("def has_a(prompts, completions, **kw):\n    return [float('a' in c) for c in completions]\n")

    def config(name: str, out: Path, **extra) -> Path:
        sets = {**BASE, **extra}
        if sets.get("rewards") == "HAS_A":
            sets["rewards"] = f"[{{name: '{has_a}:has_a'}}]"
        cfg = load_config(None, toy_config(tiny_model, toy_data, toy_reward, out, **sets))
        save_config(cfg, tmp / f"{name}.yaml")
        return tmp / f"{name}.yaml"

    jobs = []
    for name, extra in CASES.items():
        config(name, tmp / "one" / name, **extra)
        jobs.append(str(config(f"{name}-w2", tmp / "two" / name, **extra)))
    # resume at world size 2 (stopped after step 1, then continued) and a run saved at 2 for world size 1
    jobs.append(str(config("resume-w2", tmp / "two" / "resumed", **CASES["ddp-full-seqmean"], steps=1)))
    jobs.append(str(config("resume-w2-more", tmp / "two" / "resumed", **CASES["ddp-full-seqmean"])) + ":resume")
    jobs.append(str(config("fsdp-at-1", tmp / "two" / "fsdp-at-1", **CASES["fsdp-full-constant"], steps=1)))
    jobs.append(str(config("fsdp-resume-w2", tmp / "two" / "fsdp-resumed", **CASES["fsdp-full-constant"], steps=1)))
    jobs.append(str(config("fsdp-resume-w2-more", tmp / "two" / "fsdp-resumed", **CASES["fsdp-full-constant"]))
                + ":resume")
    start = time.time()
    done = torchrun(str(Path(__file__).parent / "dist_worker.py"), *jobs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    print(f"world size 2: {len(jobs)} runs in {time.time() - start:.0f} s")
    return tmp


@pytest.mark.parametrize("case", list(CASES))
def test_world_size_2_equals_one_process(case, setup, tiny_model):
    one, two = setup / "one" / case, setup / "two" / case
    train(load_config(setup / f"{case}.yaml"), console=Console(quiet=True))
    assert_same_metrics(one, two)
    start = None if CASES[case].get("model.lora.enabled") else tiny_model
    assert_same_weights(one / "checkpoints" / "step-000001", two / "checkpoints" / "step-000001", start)
    assert_same_weights(one / "final", two / "final", start)
    if CASES[case].get("algo") == "ppo" and (one / "final" / "critic").is_dir():
        assert_same_weights(one / "final" / "critic", two / "final" / "critic", None)
    info = json.loads((two / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["strategy"] == CASES[case]["distributed.strategy"]


def test_dynamic_sampling_refilled_across_ranks(setup):
    """The refill decisions are the whole batch's: some steps sampled more than one round."""
    m = read_jsonl(setup / "two" / "ddp-dynamic" / "metrics.jsonl")
    assert any(0 < x["zero_std_frac"] for x in m), m


@pytest.mark.parametrize("case, resumed", [("ddp-full-seqmean", "resumed"), ("fsdp-full-constant", "fsdp-resumed")])
def test_a_resume_at_world_size_2_equals_the_uninterrupted_run(case, resumed, setup):
    """Stopped after step 1 and resumed by 2 ranks (DDP; FSDP2 with mu = 2 and two minibatches): bit for bit."""
    a, b = setup / "two" / case / "final", setup / "two" / resumed / "final"
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert_same_metrics(setup / "two" / case, setup / "two" / resumed)


def test_a_run_saved_at_world_size_2_resumes_at_world_size_1(setup, tmp_path):
    """FSDP2 shards written by 2 ranks, read by one process: the continued run equals the one-process run."""
    run = tmp_path / "run"
    shutil.copytree(setup / "two" / "fsdp-at-1", run)
    assert (run / "final" / "rng-1.pt").is_file()  # written at world size 2
    cfg = load_config(setup / "fsdp-full-constant.yaml", [f"output_dir={run}"])
    train(cfg, console=Console(quiet=True), resume=True)
    one = setup / "one" / "fsdp-full-constant"
    if not (one / "final").is_dir():
        train(load_config(setup / "fsdp-full-constant.yaml"), console=Console(quiet=True))
    assert_same_weights(one / "final", run / "final", None)
    assert_same_metrics(one, run)


def grouprl_nproc(*args: str, timeout: float = 240) -> tuple[int, str, float]:
    start = time.time()
    p = subprocess.run([sys.executable, "-m", "grouprl", "train", "--nproc", "2", *args], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout + p.stderr, time.time() - start


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


def job_where_rank_1_fails(setup, tmp_path, failure: str) -> tuple[int, str, float]:
    """`grouprl train --nproc 2` with a reward function that runs `failure` on rank 1 at its third call (the
    start-up probe, step 1, then step 2) and scores 0.5 otherwise."""
    bad = tmp_path / "bad.py"
    bad.write_text(f"import os\ncalls = 0\ndef flaky(prompts, completions, **kw):\n    global calls\n"
                   f"    calls += 1\n    if os.environ.get('RANK') == '1' and calls == 3:\n        {failure}\n"
                   "    return [0.5] * len(completions)\n")
    cfg = load_config(setup / "ddp-full-seqmean.yaml", [f"output_dir={tmp_path / 'out'}",
                                                         f"rewards=[{{name: '{bad}:flaky'}}]",
                                                         "distributed.timeout_s=30"])
    save_config(cfg, tmp_path / "c.yaml")
    return grouprl_nproc("--config", str(tmp_path / "c.yaml"))


def test_a_rank_that_raises_stops_the_job_with_one_line(setup, tmp_path):
    rc, log, seconds = job_where_rank_1_fails(setup, tmp_path, "raise ValueError('no score for this one')")
    lines = error_lines(log)
    assert rc == 2 and len(lines) == 1, log[-3000:]
    assert "rank 1:" in lines[0] and "no score for this one" in lines[0] and "flaky" in lines[0], lines
    assert "Traceback" not in log and seconds < 120
    assert (tmp_path / "out" / "checkpoints" / "step-000001" / "COMPLETE").is_file()  # step 1 kept


def test_a_rank_that_dies_stops_the_job_within_the_timeout(setup, tmp_path):
    rc, log, seconds = job_where_rank_1_fails(setup, tmp_path, "os._exit(3)")
    assert rc != 0 and seconds < 120, log[-3000:]
    lines = error_lines(log)  # the launcher's, naming the rank that died; before it, unless the launcher's stop
    # came first, rank 0's, which gloo's message (with its "[/__w/pytorch/...]") no longer cuts short
    assert "Traceback" not in log, log[-3000:]
    assert 1 <= len(lines) <= 2 and "rank 1" in lines[-1], log[-3000:]
    assert all("lost contact with another rank" in line for line in lines[:-1]), log[-3000:]


def test_world_size_checks_are_one_line(setup, tmp_path):
    rc, log, _ = grouprl_nproc("--config", str(setup / "ddp-full-seqmean.yaml"), "--set",
                               "rollout.prompts_per_step=3", "--set", f"output_dir={tmp_path / 'o'}")
    lines = error_lines(log)
    assert rc == 2 and len(lines) == 1 and "divisible by the world size 2" in lines[0], log[-3000:]
    assert not (tmp_path / "o").exists()


def test_ctrl_c_stops_every_rank_after_the_same_step_with_a_checkpoint(setup, tmp_path):
    """A Ctrl-C in the terminal (sent to the launcher's process group) reaches both ranks through the launcher;
    they agree on the step to stop after, save it together, leave the process group and exit, and the job
    says so in one line (exit 130); the run then resumes."""
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ndef slow(prompts, completions, **kw):\n    time.sleep(0.5)\n"
                    "    return [c.count('a') / max(len(c), 1) for c in completions]\n")
    out = tmp_path / "out"
    cfg = load_config(setup / "ddp-full-seqmean.yaml", [f"output_dir={out}", f"rewards=[{{name: '{slow}:slow'}}]",
                                                         "steps=50", "save_every=0"])
    save_config(cfg, tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "grouprl", "train", "--nproc", "2", "--config",
                             str(tmp_path / "c.yaml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():  # step 1 done
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stdout, stderr = proc.communicate(timeout=120)
    lines = error_lines(stdout + stderr)
    assert proc.returncode == 130 and len(lines) == 1 and "Resume with" in lines[0], stdout[-2000:] + stderr[-3000:]
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file() and (saved[0] / "rng-1.pt").is_file()
    step = int(saved[0].name.split("-")[1])
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, step + 1))
    rc, log, _ = grouprl_nproc("--resume", str(out), "--set", f"steps={step + 1}")
    assert rc == 0, log[-3000:]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, step + 2))


def test_a_prompts_completions_do_not_depend_on_the_rest_of_the_batch(tiny_model):
    """Per-prompt seeds: prompt b sampled beside prompt a, or alone, or first, draws the same completions
    (what lets a rank sample its slice and match one process)."""
    from grouprl.batch import sampling_seed
    from grouprl.models import load_tokenizer
    from grouprl.rollout import generate
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = load_tokenizer(str(tiny_model))
    a, b = "<|user|>say a 1<|end|><|assistant|>", "<|user|>a longer prompt, b<|end|><|assistant|>"
    sa, sb = sampling_seed(0, 1, 0, 0), sampling_seed(0, 1, 0, 1)

    def draw(prompts, seeds):
        return generate(model, tok, prompts, group_size=4, max_new_tokens=10, seeds=seeds).completions

    both = draw([a, b], [sa, sb])
    assert draw([b], [sb]) == both[4:] and draw([a], [sa]) == both[:4]
    assert draw([b, a], [sb, sa]) == both[4:] + both[:4]
    assert draw([a, b], [sa, sa + 1]) != both  # another seed, other completions
    assert len({sampling_seed(0, s, r, p) for s in range(3) for r in range(2) for p in range(4)}) == 24


def test_a_rank_share_of_a_minibatch_and_the_padding_passes(monkeypatch):
    from grouprl import distributed, learner

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(learner, "world_size", lambda: 2)
    groups = torch.tensor([5, 1, 4])  # 3 groups on 2 ranks: one rank runs a padding pass
    shares = {}
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares[r] = learner.my_micro_batches(groups, per_micro=1)
    assert [x.tolist() if x is not None else None for x in shares[0]] == [[5], None]
    assert [x.tolist() for x in shares[1]] == [[1], [4]]
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert [x.tolist() for x in learner.my_micro_batches(groups, per_micro=2)] == [[1, 4]]


@pytest.mark.parametrize("sets, world, strategy, needle", [
    ({"rollout.prompts_per_step": 6}, 4, "ddp", "rollout.prompts_per_step=6 must be divisible by the world size 4"),
    ({"rollout.prompts_per_step": 4, "grpo.minibatches": 4}, 2, "ddp", "groups per minibatch"),
    ({"grpo.micro_batch_size": 12}, 2, "ddp", "micro_batch_size=12 must be a multiple of rollout.group_size=8"),
    ({"save_merged": True}, 2, "fsdp2", "save_merged is not supported with distributed.strategy=fsdp2"),
    ({"distributed.cpu_offload": True}, 2, "ddp", "cpu_offload needs distributed.strategy=fsdp2"),
])
def test_world_size_problems(sets, world, strategy, needle):
    from grouprl.config import world_problems

    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    assert any(needle in p for p in world_problems(cfg, world, strategy)), world_problems(cfg, world, strategy)
    assert world_problems(load_config(None, []), 2, strategy) == []  # the defaults split in two


LEAVE_AFTER_AN_ERROR = """
import os, sys, weakref
import torch, torch.distributed as dist
from grouprl import distributed

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
refs = []

def step():
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    refs.append(weakref.ref(model))
    model(torch.ones(1, 2)).sum().backward()
    raise RuntimeError("a step failed")

try:
    try:
        step()
    except RuntimeError as e:
        raise ValueError("reported") from e  # the model is in the chained exception's frames
except ValueError as err:
    alive = []
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *a: (alive.append(refs[0]() is not None), destroy(*a))
    distributed.shutdown(err)
    print("alive at destroy:", alive, "initialized:", dist.is_initialized())
"""


def test_leaving_the_process_group_releases_the_models_an_error_still_holds_first(tmp_path):
    """distributed.shutdown(err) frees the DDP model that err's traceback (or the error it chains) still
    holds before destroying the group: a DDP reducer freed after the group joins gloo's threads while holding
    the GIL, which hung a stopped job at exit about once in ten Ctrl-Cs on two busy cores."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "leave.py").write_text(LEAVE_AFTER_AN_ERROR)
    run = subprocess.run([sys.executable, str(tmp_path / "leave.py"), str(port)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "alive at destroy: [False] initialized: False" in run.stdout, run.stdout + run.stderr[-3000:]


def test_the_workers_die_with_their_launcher(setup, tmp_path):
    """A SIGKILL of `grouprl train --nproc 2` (no handler can run) ends both workers at once: none trains on
    or holds the run's lock, and the run resumes from its last checkpoint."""
    from grouprl.checkpoint import checkpoint_step, latest_checkpoint

    out = tmp_path / "out"
    cfg = load_config(setup / "ddp-full-seqmean.yaml", [f"output_dir={out}", "steps=200", "save_every=1"])
    save_config(cfg, tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "grouprl", "train", "--nproc", "2", "--config",
                             str(tmp_path / "c.yaml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    while latest_checkpoint(out) is None:  # step 1 saved
        assert proc.poll() is None
        time.sleep(0.1)
    workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
               if _ppid(p) == proc.pid]
    assert len(workers) >= 2, workers
    proc.kill()
    proc.wait()
    for _ in range(300):
        alive = [w for w in workers if os.path.exists(f"/proc/{w}") and
                 open(f"/proc/{w}/stat").read().rpartition(")")[2].split()[0] != "Z"]
        if not alive:
            break
        time.sleep(0.1)
    else:
        for w in alive:
            os.kill(w, signal.SIGKILL)
        raise AssertionError(f"workers {alive} outlived their launcher")
    step = checkpoint_step(latest_checkpoint(out))
    rc, log, _ = grouprl_nproc("--resume", str(out), "--set", f"steps={step + 1}")  # the lock was let go
    assert rc == 0, log[-3000:]


def _ppid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None
