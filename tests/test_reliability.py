"""Safe to stop, safe to load: kills at random moments and inside checkpoint writes, Ctrl-C, two writers, and
checkpoints that ask for remote code. Each resumed run must equal one that never stopped, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import read_dcp
from grouprl.checkpoint import MARKER, clean_leftovers, complete_checkpoints, latest_checkpoint, prune_checkpoints
from grouprl.cli import app
from grouprl.guard import RunLock
from grouprl.metrics import read_jsonl, truncate_jsonl
from test_learning import toy_config

TIMING = {"step_time", "gen_time", "score_time", "update_time", "gen_tokens_per_s", "peak_mem_gib", "elapsed",
          "prep_time"}
STEPS = 6


def write_config(tiny_model, toy_data, toy_reward, tmp: Path, name: str, **extra) -> Path:
    """A YAML config of a small GRPO run with a reference, mu = 2 and two minibatches (RNG, pi_old, pi_ref)."""
    sets = toy_config(tiny_model, toy_data, toy_reward, tmp / "unused", **{
        "steps": STEPS, "rollout.group_size": 4, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 8,
        "grpo.mu": 2, "grpo.minibatches": 2, "grpo.beta": 0.01, "save_every": 1, "threads": 1, **extra})
    from grouprl.config import load_config, save_config

    cfg = load_config(None, sets)
    path = tmp / f"{name}.yaml"
    save_config(cfg, path)
    return path


def grouprl(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grouprl", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def same_run(a: Path, b: Path) -> None:
    """Metrics (timings aside), completions and final weights and optimizer state are identical."""
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))
    for x, y in zip(ma, mb):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
    assert (a / "completions.jsonl").read_text() == (b / "completions.jsonl").read_text()
    files = sorted(p.relative_to(a / "final") for p in (a / "final").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b / "final") for p in (b / "final").rglob("*.safetensors")) and files
    for f in files:  # the policy (full or adapter), and a critic's weights and value head
        wa, wb = load_file(a / "final" / f), load_file(b / "final" / f)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f
    sa, sb = read_dcp(a / "final" / "dcp"), read_dcp(b / "final" / "dcp")  # weights and AdamW moments
    assert sa.keys() == sb.keys() and any(".exp_avg" in k for k in sa)
    assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


def reference_run(tmp: Path, config: Path) -> tuple[Path, Path]:
    """(config, output folder) of an uninterrupted run, in a process of its own like the interrupted ones."""
    rc, log = finish(grouprl("--config", str(config), "--set", f"output_dir={tmp / 'out'}"))
    assert rc == 0, log
    return config, tmp / "out"


@pytest.fixture(scope="module")
def straight(tiny_model, toy_data, toy_reward, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("straight")
    return reference_run(tmp, write_config(tiny_model, toy_data, toy_reward, tmp, "run"))


@pytest.fixture(scope="module")
def straight_ppo(tiny_model, toy_data, toy_reward, tmp_path_factory) -> tuple[Path, Path]:
    """PPO with LoRA adapters on the policy and a separate LoRA critic: two optimizers, the critic's files."""
    tmp = tmp_path_factory.mktemp("straight_ppo")
    return reference_run(tmp, write_config(tiny_model, toy_data, toy_reward, tmp, "ppo", **{
        "algo": "ppo", "model.lora.enabled": "true", "model.lora.r": 4, "optim.lr": 1e-2, "ppo.epochs": 2,
        "ppo.minibatches": 2, "ppo.kl_coef": 0.05}))


@pytest.mark.parametrize("run, faults", [
    ("straight", ["checkpoint:weights@2", "checkpoint:optimizer@1", "checkpoint:before-marker@2"]),
    ("straight_ppo", ["checkpoint:extra@2", "checkpoint:before-marker@3"]),
])
def test_sigkill_anywhere_then_resume_equals_uninterrupted(run, faults, request, tmp_path):
    """Forced kills inside checkpoint writes (after the weights, after the optimizer, inside the critic's
    save, just before the commit marker), then kills at random moments; every resume works without manual
    cleanup, and the finished run equals the one that never stopped."""
    config, reference = request.getfixturevalue(run)
    out = tmp_path / "out"
    args = ["--config", str(config), "--resume", str(out)]  # --config: a run killed before its first save restarts
    for fault in faults:
        rc, log = finish(grouprl(*args, env={"GROUPRL_FAULT": fault}))
        assert rc == -signal.SIGKILL, log
        leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
        assert leftovers, f"{fault}: the kill should have left a half-written checkpoint"
    rng = random.Random(int(os.environ.get("GROUPRL_FAULT_SEED", "0")))
    for _ in range(2):
        proc = grouprl(*args)
        time.sleep(rng.uniform(6.0, 12.0))  # the import takes a few seconds; then steps and checkpoint writes
        proc.kill()
        proc.wait()
    rc, log = finish(grouprl(*args))
    assert rc == 0, log
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-") or "." in p.name]
    same_run(reference, out)


def test_sigint_saves_a_checkpoint_and_resumes_exactly(straight, tmp_path):
    config, reference = straight
    out = tmp_path / "out"
    proc = grouprl("--config", str(config), "--set", f"output_dir={out}", "--set", "save_every=0")
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and len(read_jsonl(out / "metrics.jsonl")) >= 2):
        assert time.time() < deadline and proc.poll() is None, finish(proc)[1]
        time.sleep(0.05)
    second = CliRunner().invoke(app, ["train", "--resume", str(out)])  # a second writer while it trains
    assert second.exit_code == 2 and f"in use by another grouprl process (pid {proc.pid})" in second.output
    proc.send_signal(signal.SIGINT)
    rc, log = finish(proc)
    assert rc == 130, log
    done = len(read_jsonl(out / "metrics.jsonl"))
    assert done < STEPS
    step, saved = complete_checkpoints(out)[-1]
    assert step == done and saved.name == f"step-{done:06d}"  # the step in progress was finished and saved
    error_lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and f"grouprl train --resume {out}" in error_lines[0], log
    rc, log = finish(grouprl("--resume", str(out)))
    assert rc == 0, log
    same_run(reference, out)


def test_second_sigint_stops_at_once(tiny_model, toy_data, toy_reward, tmp_path):
    """The second Ctrl-C does not wait for the step (here: a reward function that takes 20 s)."""
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ndef slow(prompts, completions, **kw):\n    if len(completions) > 2:  # not the "
                    "start-up probe\n        time.sleep(20)\n    return [0.0] * len(completions)\n")
    config = write_config(tiny_model, toy_data, toy_reward, tmp_path, "slow",
                          rewards=f"[{{name: '{slow}:slow'}}]", output_dir=str(tmp_path / "out"))
    proc = grouprl("--config", str(config))
    while not (tmp_path / "out" / "metrics.jsonl").is_file():  # written just before step 1 starts
        assert proc.poll() is None, finish(proc)[1]
        time.sleep(0.05)
    time.sleep(1.0)  # inside step 1's reward call
    start = time.time()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rc, log = finish(proc, timeout=30)
    assert rc == 130 and "stopped at once" in log, log
    assert time.time() - start < 10


def test_a_second_writer_is_refused_with_the_holders_pid(straight, tmp_path):
    config, reference = straight
    runner = CliRunner()
    with RunLock(reference):  # as if the run were still training
        res = runner.invoke(app, ["train", "--resume", str(reference)])
    assert res.exit_code == 2
    assert "in use by another grouprl process" in res.output and f"pid {os.getpid()}" in res.output, res.output
    out = tmp_path / "new"
    with RunLock(out):
        res = runner.invoke(app, ["train", "--config", str(config), "--set", f"output_dir={out}"])
        assert (out / ".lock").is_file()  # the refused run removes nothing of the folder it did not make
    assert res.exit_code == 2 and f"pid {os.getpid()}" in res.output, res.output
    res = runner.invoke(app, ["train", "--resume", str(reference), "--set", "steps=2"])
    assert res.exit_code == 2 and f"already at step {STEPS}" in res.output, res.output


def test_the_lock_dies_with_its_holder(tmp_path):
    """flock is released by the kernel when the holder is killed: no stale lock to remove by hand."""
    code = (f"from pathlib import Path; import time; from grouprl.guard import RunLock; "
            f"RunLock(Path({str(tmp_path)!r})).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"pid {proc.pid}"):
        RunLock(tmp_path).acquire()
    proc.kill()
    proc.wait()
    RunLock(tmp_path).acquire().release()


def test_a_checkpoint_cannot_turn_on_remote_code(straight, tmp_path):
    """A checkpoint's grouprl.yaml is data: it cannot switch on trust_remote_code for eval or --resume."""
    _, reference = straight
    import shutil

    ckpt = tmp_path / "downloaded"
    shutil.copytree(reference / "final", ckpt)
    settings = yaml.safe_load((ckpt / "grouprl.yaml").read_text())
    settings["model"]["trust_remote_code"] = True
    (ckpt / "grouprl.yaml").write_text(yaml.safe_dump(settings))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--model", str(ckpt), "--num", "1"])
    assert res.exit_code == 2 and "--trust-remote-code" in res.output, res.output
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "grouprl.yaml").write_text(yaml.safe_dump(settings))
    res = runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=7"])
    assert res.exit_code == 2 and "--trust-remote-code" in res.output, res.output
    assert len(read_jsonl(run / "metrics.jsonl")) == STEPS  # nothing ran


def test_resume_names_the_reward_code_and_warns_when_it_changed(straight, tmp_path, toy_reward):
    import shutil

    config, reference = straight
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = json.loads((run / "final" / "trainer_state.json").read_text())
    assert str(toy_reward) in state["reward_files"]  # its content hash
    state["reward_files"][str(toy_reward)] = "0" * 64  # as if the file had been edited since
    (run / "final" / "trainer_state.json").write_text(json.dumps(state))
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", "steps=7", "--set", "save_every=0"])
    assert res.exit_code == 0, res.output
    assert f"resuming imports reward code from: {toy_reward}" in res.output
    assert "changed since final was saved" in res.output


# --- the pieces, one by one ---------------------------------------------------------------------------

def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (folder / MARKER).write_text(json.dumps({"step": step}))
    return folder


def test_only_complete_checkpoints_are_listed_and_leftovers_are_tidied(tmp_path):
    c = tmp_path / "checkpoints"
    fake_checkpoint(c / "step-000002", 2)
    fake_checkpoint(c / "step-000005.tmp", 5)  # complete, killed between its two renames
    fake_checkpoint(c / "step-000003.old", 3, complete=False)
    fake_checkpoint(c / "step-000004.tmp", 4, complete=False)  # killed before its marker
    (c / "notes").mkdir()  # not ours: never touched
    fake_checkpoint(tmp_path / "final.tmp", 6, complete=False)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]
    assert latest_checkpoint(tmp_path) == c / "step-000002"
    removed = {p.name for p in clean_leftovers(tmp_path)}
    assert removed == {"step-000004.tmp", "step-000003.old", "final.tmp"}
    # a complete '.tmp' whose final name is missing was killed between the two renames: it is put in place
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 5]
    assert (c / "notes").is_dir()


def test_a_kill_between_the_renames_keeps_the_newer_checkpoint(tmp_path):
    """Rewriting final/ (a resumed run that went further): final.old (step 100) and final.tmp (step 200) are
    both complete when the kill lands between the two renames; the newer one is put in place."""
    fake_checkpoint(tmp_path / "final.old", 100)
    fake_checkpoint(tmp_path / "final.tmp", 200)
    assert {p.name for p in clean_leftovers(tmp_path)} == {"final.old"}
    assert complete_checkpoints(tmp_path) == [(200, tmp_path / "final")]


def test_checkpoints_written_before_markers_are_kept_and_listed(tmp_path):
    """A run saved by an earlier grouprl (no marker; renamed into place whole, rng.pt written last) resumes:
    nothing of it is removed, and a folder under its final name is never removed, marker or not."""
    old = fake_checkpoint(tmp_path / "checkpoints" / "step-000010", 10, complete=False)
    (old / "rng.pt").write_bytes(b"x")
    final = fake_checkpoint(tmp_path / "final", 12, complete=False)
    (final / "rng.pt").write_bytes(b"x")
    odd = fake_checkpoint(tmp_path / "checkpoints" / "step-000011", 11, complete=False)  # no rng.pt: not listed
    assert clean_leftovers(tmp_path) == [] and odd.is_dir()
    assert complete_checkpoints(tmp_path) == [(10, old), (12, final)]


def test_final_sorts_after_a_step_checkpoint_of_the_same_step(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints" / "step-000003", 3)
    fake_checkpoint(tmp_path / "final", 3)
    assert latest_checkpoint(tmp_path) == tmp_path / "final"


def test_save_total_limit_keeps_the_newest_and_final(tmp_path):
    for s in (1, 2, 3, 4):
        fake_checkpoint(tmp_path / "checkpoints" / f"step-{s:06d}", s)
    fake_checkpoint(tmp_path / "final", 5)
    prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4, 5]
    prune_checkpoints(tmp_path, None)
    assert len(complete_checkpoints(tmp_path)) == 3


def test_a_torn_last_line_is_skipped_and_trimmed(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.7}\n{"step": 3, "rew')
    assert [r["step"] for r in read_jsonl(log)] == [1, 2]
    truncate_jsonl(log, 1)
    assert log.read_text() == '{"step": 1, "reward": 0.5}\n'
    log.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # damage in the middle is not a torn write
    with pytest.raises(Exception, match="line 2"):
        read_jsonl(log)


def test_a_nonfinite_loss_skips_the_optimizer_step(tiny_model):
    """run_minibatches: a NaN loss in one minibatch skips that step (weights and AdamW state untouched) and
    is counted; the other minibatch still steps."""
    from grouprl.config import ModelConfig
    from grouprl.learner import run_minibatches
    from grouprl.optim import Optim
    from grouprl.logprobs import forward_groups
    from grouprl.models import load_policy
    from grouprl.rollout import generate

    policy, tok = load_policy(ModelConfig(name_or_path=str(tiny_model), device="cpu"))
    torch.manual_seed(0)
    ro = generate(policy, tok, ["<|user|>a<|end|><|assistant|>"] * 2, group_size=2, max_new_tokens=4)
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    optim = Optim(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0), params, 1.0)
    before = [p.detach().clone() for p in params]
    calls = []

    def micro_step(rows, norm):
        calls.append(rows.tolist())
        loss = forward_groups(policy, ro, rows).logp.sum() * (float("nan") if len(calls) == 1 else 1.0)
        return loss, {"tokens": 1.0}

    done = run_minibatches(ro, ro.completion_mask, epochs=1, minibatches=2, micro_batch_size=2, max_len=4,
                           optims=[optim], models=[policy], micro_step=micro_step)
    assert (done.steps, done.nonfinite) == (1, 1) and len(calls) == 2
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))  # the good minibatch stepped
    assert opt.state and all(int(st["step"]) == 1 for st in opt.state.values())  # AdamW saw one step, not two


def test_nonfinite_steps_in_a_row_stop_the_run_with_its_checkpoint_intact(straight, tmp_path, monkeypatch):
    import grouprl.grpo as grpo

    config, _ = straight
    real = grpo.grpo_loss
    step = {"n": 0}

    def poisoned(*args, **kwargs):  # steps 1-2 are fine, every loss after that is NaN
        loss, stats = real(*args, **kwargs)
        step["n"] += 1
        return (loss * float("nan") if step["n"] > 8 else loss), stats  # 4 minibatch passes of 2 micro each

    monkeypatch.setattr(grpo, "grpo_loss", poisoned)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["train", "--config", str(config), "--set", f"output_dir={out}",
                                   "--set", "max_nonfinite_steps=2"])
    assert res.exit_code == 2, res.output
    assert "2 steps in a row had a non-finite loss or gradient norm" in " ".join(res.output.split())
    assert latest_checkpoint(out).name == "step-000003"  # step 3 took no step but its state is good
    weights = load_file(latest_checkpoint(out) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "final").exists()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r.get("nonfinite_steps") for r in rows] == [0, 0, 4, 4] and "loss" not in rows[-1]


def test_eval_of_a_run_folder_takes_its_latest_complete_checkpoint(straight, tmp_path):
    import shutil

    _, reference = straight
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    fake_checkpoint(run / "checkpoints" / "step-000009.tmp", 9)  # a half-written one is never read
    res = CliRunner().invoke(app, ["eval", "--model", str(run), "--num", "1", "-o", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["model"] == str(run / "checkpoints" / f"step-{STEPS - 1:06d}")


def test_a_batch_with_every_completion_masked_is_no_update(tiny_model):
    """mask_truncated with every completion cut at max_new_tokens: nothing to learn from, no optimizer step,
    and no made-up numbers (the statistics are None), even though the rewards differ."""
    from grouprl.config import GRPOConfig, ModelConfig
    from grouprl.grpo import grpo_update
    from grouprl.optim import Optim
    from grouprl.models import load_policy
    from grouprl.rollout import generate

    policy, tok = load_policy(ModelConfig(name_or_path=str(tiny_model), device="cpu"))
    torch.manual_seed(0)
    ro = generate(policy, tok, ["<|user|>a<|end|><|assistant|>"] * 2, group_size=2, max_new_tokens=1)
    ro = ro._replace(truncated=torch.ones_like(ro.truncated))
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    optim = Optim(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0), params, 1.0)
    stats = grpo_update(policy, None, optim, ro, torch.tensor([1.0, -1.0, 1.0, -1.0]),
                        GRPOConfig(beta=0.0, mask_truncated=True, minibatches=2), max_new_tokens=1)
    assert stats.loss is None and stats.grad_norm is None and not opt.state
