"""Exact resume: a run stopped after step k and resumed gives the same steps, numbers and weights as one that
never stopped, for GRPO and for PPO (critic, two optimizers and the adaptive KL coefficient included)."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from grouprl.cli import app
from grouprl.config import load_config
from grouprl.errors import UserError
from grouprl.loop import train
from test_learning import toy_config

CASES = {
    "grpo": {"grpo.mu": 2, "grpo.minibatches": 2, "grpo.beta": 0.01},  # randperm, pi_old, a reference
    "ppo": {"algo": "ppo", "ppo.epochs": 2, "ppo.minibatches": 2, "ppo.kl_target": 0.5, "ppo.kl_horizon": 50},
    "ppo-lora": {"algo": "ppo", "model.lora.enabled": "true", "model.lora.r": 4, "optim.lr": 1e-2},  # adapters
    "grpo-episodes": {"env.name": "guess", "env.max_turns": 3, "rollout.max_new_tokens": 48, "task.prefill": "50",
                      "grpo.mu": 2},  # turns sampled from their own seeds
}


def small(tiny_model, toy_data, toy_reward, out, algo: str, steps: int) -> list[str]:
    return toy_config(tiny_model, toy_data, toy_reward, out, **{
        "steps": steps, "rollout.group_size": 4, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 8,
        "save_every": 2, **CASES[algo]})


def weights(folder):
    full = folder / "model.safetensors"
    return load_file(full if full.is_file() else folder / "adapter_model.safetensors")


@pytest.mark.parametrize("algo", sorted(CASES))
def test_stopped_and_resumed_equals_uninterrupted(algo, tiny_model, toy_data, toy_reward, tmp_path):
    quiet = Console(quiet=True)
    straight = train(load_config(None, small(tiny_model, toy_data, toy_reward, tmp_path / "a", algo, 4)), quiet)

    out = tmp_path / "b"
    train(load_config(None, small(tiny_model, toy_data, toy_reward, out, algo, 3)), quiet)  # stops after step 3
    # A crash after step 3 loses it: the latest checkpoint is step 2, so steps 3 and 4 run again.
    import shutil

    shutil.rmtree(out / "final")
    resumed = train(load_config(None, small(tiny_model, toy_data, toy_reward, out, algo, 4)), quiet, resume=True)

    ppo = algo.startswith("ppo")
    keys = ["reward", "loss", "kl", "clip_frac", "completion_len"] + (["value_loss", "kl_coef"] if ppo else []) \
        + (["episode/turns", "reward/env"] if "episodes" in algo else [])
    if "episodes" in algo:
        assert max(h["episode/turns"] for h in straight.history) > 1
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(straight.history, resumed.history):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # the lost step 3 was dropped from the log and written again
    completions = [json.loads(x)["completion"] for x in (out / "completions.jsonl").read_text().splitlines()]
    assert completions == [json.loads(x)["completion"] for x in
                           (tmp_path / "a" / "completions.jsonl").read_text().splitlines()]
    a, b = weights(straight.final_checkpoint), weights(resumed.final_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if ppo:
        ca = load_file(straight.final_checkpoint / "critic" / "value_head.safetensors")
        cb = load_file(resumed.final_checkpoint / "critic" / "value_head.safetensors")
        assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_cli_resume_continues_a_finished_run_with_more_steps(tiny_model, toy_data, toy_reward, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, small(tiny_model, toy_data, toy_reward, out, "grpo", 2)), Console(quiet=True))
    res = CliRunner().invoke(app, ["train", "--resume", str(out), "--set", "steps=3"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "resumed after step 2" in " ".join(res.output.split())
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 3


def test_a_used_output_dir_is_refused_without_resume(tiny_model, toy_data, toy_reward, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, small(tiny_model, toy_data, toy_reward, out, "grpo", 1)), Console(quiet=True))
    with pytest.raises(UserError, match="--resume"):
        train(load_config(None, small(tiny_model, toy_data, toy_reward, out, "grpo", 2)), Console(quiet=True))
    res = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no grouprl.yaml" in res.output


def test_resume_with_other_settings_is_refused(tiny_model, toy_data, toy_reward, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, small(tiny_model, toy_data, toy_reward, out, "grpo", 2)), Console(quiet=True))
    changed = small(tiny_model, toy_data, toy_reward, out, "grpo", 3) + ["algo=ppo", "optim.lr=0.1"]
    with pytest.raises(UserError, match=r"other settings \(algo, optim.lr\)"):
        train(load_config(None, changed), Console(quiet=True), resume=True)


def test_a_checkpoint_before_the_first_optimizer_step_changes_nothing(tiny_model, toy_data, toy_reward, tmp_path):
    """During PPO's critic warm-up the policy's optimizer has not stepped. Saving must not give it state (torch
    builds one with a step at lr 0, after which the first real step would be about 0.7x as large), and a resume
    from there must leave it without state too."""
    def cfg(out, save_every, steps=3):
        return load_config(None, toy_config(tiny_model, toy_data, toy_reward, out, **{
            "steps": steps, "rollout.group_size": 4, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 8,
            "algo": "ppo", "ppo.critic_warmup_steps": 2, "save_every": save_every}))
    quiet = Console(quiet=True)
    plain = train(cfg(tmp_path / "a", 0), quiet)
    saved = train(cfg(tmp_path / "b", 1), quiet)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["optimizers_stepped"] == ["critic"]
    a, b = weights(plain.final_checkpoint), weights(saved.final_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    import shutil

    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000002")
    resumed = train(cfg(tmp_path / "b", 1), quiet, resume=True)  # from step 1, inside the warm-up
    c = weights(resumed.final_checkpoint)
    assert all(torch.equal(a[k], c[k]) for k in a)
