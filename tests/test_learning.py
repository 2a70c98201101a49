"""A tiny random model measurably learns a toy task under GRPO, through the public API."""

from __future__ import annotations

from rich.console import Console

from grouprl.config import load_config
from grouprl.loop import train


def toy_config(tiny_model, toy_data, toy_reward, out, **extra) -> list[str]:
    sets = {
        "model.name_or_path": str(tiny_model), "task.name": "dataset", "task.source": str(toy_data),
        "task.prefill": "", "task.system_prompt": "x", "task.num_eval": 8,
        "rewards": f"[{{name: '{toy_reward}:frac_a', weight: 1.0}}]", "steps": 20, "seed": 0,
        "rollout.group_size": 8, "rollout.prompts_per_step": 4, "rollout.max_new_tokens": 12,
        "grpo.beta": 0.0, "optim.lr": 3e-3, "output_dir": str(out),
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def test_grpo_tiny_model_learns(tiny_model, toy_data, toy_reward, tmp_path):
    cfg = load_config(None, toy_config(tiny_model, toy_data, toy_reward, tmp_path / "run"))
    result = train(cfg, console=Console(quiet=True))
    rewards = [h["reward"] for h in result.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.15, rewards  # a random model rarely says 'a'
    assert last > first + 0.3, rewards
    assert (result.final_checkpoint / "model.safetensors").is_file()
