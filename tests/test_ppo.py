"""PPO's parts on the tiny model: the CLI, the critic's checkpoint, the shared value head and warm-up, the
missing-EOS penalty, and a learned reward model as a reward function for both algorithms."""

from __future__ import annotations

import json

import pytest

import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import read_dcp
from grouprl.cli import app
from grouprl.config import load_config
from grouprl.errors import UserError
from grouprl.loop import train
from grouprl.rewards import RewardSet
from test_learning import toy_config


@pytest.fixture(scope="module")
def length_reward(tmp_path_factory):
    """A reward that is never all zero (a random model rarely says 'a'), so the critic has returns to fit."""
    path = tmp_path_factory.mktemp("len") / "length.py"
    path.write_text("def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n")
    return f"[{{name: '{path}:length', weight: 1.0}}]"


def quick(tiny_model, toy_data, toy_reward, out, **extra) -> list[str]:
    return toy_config(tiny_model, toy_data, toy_reward, out, **{
        "algo": "ppo", "steps": 2, "rollout.group_size": 4, "rollout.prompts_per_step": 2,
        "rollout.max_new_tokens": 6, **extra})


def test_cli_train_algo_ppo_writes_ppo_metrics_and_the_critic(tiny_model, toy_data, toy_reward, tmp_path):
    out = tmp_path / "run"
    sets = [a for s in quick(tiny_model, toy_data, toy_reward, out) if not s.startswith("algo=")
            for a in ("--set", s)]
    res = CliRunner().invoke(app, ["train", "--algo", "ppo", *sets], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("value_loss", "explained_var", "value_clip_frac", "approx_kl", "clip_frac", "kl", "kl_coef",
                "entropy", "reward", "critic_grad_norm", "prep_time", "gen_time", "update_time"):
        assert key in m, key
    assert (out / "final" / "critic" / "value_head.safetensors").is_file()
    saved = read_dcp(out / "final" / "dcp")
    assert any(k.startswith("policy.optim.state.") for k in saved)
    assert any(k.startswith("critic.optim.state.head.") for k in saved)  # the value head's AdamW moments
    assert any(k.startswith("critic.model.model.") for k in saved)  # the separate critic's own weights
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["kl_coef"] == pytest.approx(0.05) and set(state["schedulers"]) == {"policy", "critic"}


def test_critic_starts_from_a_saved_critic(tiny_model, toy_data, toy_reward, length_reward, tmp_path):
    from grouprl.critic import load_critic
    from grouprl.models import load_policy

    first = train(load_config(None, quick(tiny_model, toy_data, toy_reward, tmp_path / "a",
                                          **{"ppo.critic.lr": 1e-2, "rewards": length_reward})),
                  console=Console(quiet=True))
    saved = first.final_checkpoint / "critic"
    head = load_file(saved / "value_head.safetensors")
    assert head["linear.weight"].abs().sum() > 0  # the head learned something
    cfg = load_config(None, quick(tiny_model, toy_data, toy_reward, tmp_path / "b",
                                  **{"ppo.critic.name_or_path": str(saved)}))
    policy, _ = load_policy(cfg.model)
    critic = load_critic(cfg, policy)
    torch.testing.assert_close(critic.head.linear.weight.detach(), head["linear.weight"])
    trunk = load_file(saved / "model.safetensors")
    name = next(k for k in trunk if k.endswith("layers.0.mlp.up_proj.weight"))
    torch.testing.assert_close(dict(critic.model.named_parameters())[name].detach(), trunk[name])


def test_shared_value_head_and_critic_warmup_leave_the_policy_alone(tiny_model, toy_data, toy_reward, length_reward,
                                                                   tmp_path):
    """During warm-up only the critic trains: with a head on the policy's trunk, the trunk must not move."""
    sets = quick(tiny_model, toy_data, toy_reward, tmp_path / "h", **{
        "ppo.critic.kind": "head", "ppo.critic_warmup_steps": 2, "ppo.critic.lr": 1e-2, "rewards": length_reward})
    result = train(load_config(None, sets), console=Console(quiet=True))
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(result.final_checkpoint / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    head = load_file(result.final_checkpoint / "value_head.safetensors")
    assert head["linear.bias"].abs().sum() > 0
    assert all(h["grad_norm"] == 0 and h["critic_grad_norm"] > 0 for h in result.history)
    assert not (result.final_checkpoint / "critic").exists()


def test_missing_eos_penalty_lands_on_the_last_token(tiny_model):
    from grouprl.config import PPOConfig, TrainConfig
    from grouprl.critic import load_critic
    from grouprl.models import load_policy
    from grouprl.optim import make_optimizer
    from grouprl.ppo import ppo_update
    from grouprl.rollout import generate

    cfg = TrainConfig.model_validate({"model": {"name_or_path": str(tiny_model), "device": "cpu"}})
    policy, tok = load_policy(cfg.model)
    critic = load_critic(cfg, policy)  # zero head: V_old = 0, so the advantage is the reward to go
    torch.manual_seed(0)
    ro = generate(policy, tok, ["<|user|>a<|end|><|assistant|>"] * 2, group_size=4, max_new_tokens=3)
    assert ro.truncated.any()
    ppo = PPOConfig(missing_eos_penalty=1.5, whiten_advantages=False, kl_coef=0.0, lam=1.0, epochs=1)
    params = list(policy.parameters())
    opt = make_optimizer(params, 1e-3, cfg.optim)
    copt = make_optimizer(critic.parameters(), 1e-3, cfg.optim)
    score = torch.arange(8, dtype=torch.float32)
    _, adv = ppo_update(policy, critic, None, opt, copt, ro, score, ppo, kl_coef=0.0, max_new_tokens=3)
    expected = score - 1.5 * ro.truncated.float()
    # gamma = lam = 1 and V = 0: every token's advantage is the final score
    torch.testing.assert_close(adv, expected.unsqueeze(1) * ro.completion_mask)


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("rm") / "rm"
    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


def test_reward_model_scores_each_text_as_the_model_does(tiny_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rewards = RewardSet([(f"rm:{tiny_reward_model}", 2.0)])
    prompts, completions = ["<|user|>hi<|end|><|assistant|>"] * 3, ["a", "abc abc", "the answer is 4"]
    per_fn, total = rewards.score(prompts, completions, {})
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    with torch.no_grad():  # one text at a time: no padding to get wrong
        alone = [model(**tok(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                 for p, c in zip(prompts, completions)]
    torch.testing.assert_close(per_fn[:, 0], torch.tensor(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, 2.0 * torch.tensor(alone), rtol=1e-5, atol=1e-5)


def test_reward_model_with_two_outputs_is_refused(tmp_path, tiny_model):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    LlamaForSequenceClassification(AutoConfig.from_pretrained(tiny_model, num_labels=2)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="num_labels = 1"):
        RewardSet([(f"rm:{tmp_path}", 1.0)])
    with pytest.raises(UserError, match="not found"):
        RewardSet([(f"rm:{tmp_path / 'missing'}", 1.0)])


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_reward_model_drives_either_algorithm(algo, tiny_model, toy_data, toy_reward, tiny_reward_model, tmp_path):
    sets = quick(tiny_model, toy_data, toy_reward, tmp_path / algo, algo=algo,
                 rewards=f"[{{name: 'rm:{tiny_reward_model}', weight: 1.0}}]")
    result = train(load_config(None, sets), console=Console(quiet=True))
    assert len(result.history) == 2 and all(r["reward_std"] > 0 for r in result.history)


def test_lora_critic_resumes_from_its_adapter(tiny_model, toy_data, toy_reward, length_reward, tmp_path):
    from grouprl.critic import load_critic
    from grouprl.models import load_policy

    lora = {"model.lora.enabled": "true", "model.lora.r": 4, "ppo.critic.lr": 1e-2, "rewards": length_reward}
    first = train(load_config(None, quick(tiny_model, toy_data, toy_reward, tmp_path / "a", **lora)),
                  console=Console(quiet=True))
    saved = first.final_checkpoint / "critic"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    cfg = load_config(None, quick(tiny_model, toy_data, toy_reward, tmp_path / "b",
                                  **lora, **{"ppo.critic.name_or_path": str(saved)}))
    critic = load_critic(cfg, load_policy(cfg.model)[0])
    adapter = load_file(saved / "adapter_model.safetensors")
    params = dict(critic.model.named_parameters())
    moved = [k for k, v in adapter.items() if "lora_B" in k and v.abs().sum() > 0]
    assert moved  # the adapter learned, and it is loaded, trainable, in the new critic
    for k in moved:
        name = next(n for n in params if n.startswith(k.removesuffix(".weight")))
        assert params[name].requires_grad
        torch.testing.assert_close(params[name].detach(), adapter[k])


def test_adapter_critic_shares_the_frozen_base_and_leaves_the_policy_alone(tiny_model):
    """kind adapter: a second LoRA adapter on the policy's own base. The policy's log-probs do not change when
    it is added, V is the hidden state of base + critic adapter (as a separate model with those weights
    gives), every adapter stays trainable, and the two optimizers split the trainable weights between them."""
    from grouprl.config import TrainConfig
    from grouprl.critic import active_adapter, load_critic
    from grouprl.logprobs import forward_groups
    from grouprl.models import add_lora, load_causal_lm, load_policy
    from grouprl.ppo import PPO
    from grouprl.rollout import generate

    lora = {"enabled": True, "r": 4, "alpha": 8, "target_modules": "all-linear"}
    cfg = TrainConfig.model_validate({"algo": "ppo", "model": {"name_or_path": str(tiny_model), "device": "cpu",
                                                               "lora": lora},
                                      "ppo": {"kl_coef": 0.0, "critic": {"kind": "adapter", "lr": 1e-3,
                                                                         "head_lr": 2e-5}}})
    policy, tok = load_policy(cfg.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, q in policy.named_parameters():
            if "lora_B" in n:
                q.normal_(std=0.2)  # an adapter that changes the policy
    ro = generate(policy, tok, ["<|user|>a<|end|><|assistant|>", "<|user|>bb<|end|><|assistant|>"], group_size=4,
                  max_new_tokens=4)
    rows = torch.arange(8)
    with torch.no_grad():
        before = forward_groups(policy, ro, rows).logp
    critic = load_critic(cfg, policy)
    with torch.no_grad():
        for n, q in policy.named_parameters():
            if "lora_B.critic" in n:
                q.normal_(std=0.2)
        critic.head.linear.weight.normal_()
        torch.testing.assert_close(forward_groups(policy, ro, rows).logp, before, rtol=0, atol=0)
        values = critic.values(ro, rows, "shared")
    assert all(q.requires_grad for n, q in policy.named_parameters() if "lora_" in n)
    assert policy.active_adapter == "default"
    # the same V from a model of its own: the base with the critic adapter's weights as its only adapter
    alone = add_lora(load_causal_lm(str(tiny_model), cfg.model), cfg.model.lora)
    critic_weights = {n.replace(".critic.", ".default."): q for n, q in policy.named_parameters()
                      if ".critic." in n}
    alone.load_state_dict(critic_weights, strict=False)
    with torch.no_grad():
        hidden = forward_groups(alone, ro, rows, with_logp=False, with_hidden=True).hidden
        torch.testing.assert_close(values, critic.head(hidden), rtol=1e-5, atol=1e-5)
        with active_adapter(policy, "critic"):
            assert policy.active_adapter == "critic"
    ppo = PPO(cfg, load_policy(cfg.model)[0])
    policy_params = {id(q) for g in ppo.policy_optim.optimizer.param_groups for q in g["params"]}
    critic_params = {id(q) for g in ppo.critic_optim.optimizer.param_groups for q in g["params"]}
    trainable = {id(q) for q in ppo.policy.parameters() if q.requires_grad}
    trainable |= {id(q) for q in ppo.critic.head.parameters()}
    assert not policy_params & critic_params and policy_params | critic_params == trainable
    assert (ppo.models_in_memory, ppo.models_trained) == (1, 2)
    head = {id(q) for q in ppo.critic.head.parameters()}  # the head in a group of its own, at its own lr
    assert [({id(q) for q in g["params"]} == head, g["lr"]) for g in ppo.critic_optim.optimizer.param_groups] == [
        (False, 1e-3), (True, 2e-5)]


def test_adapter_critic_trains_saves_and_fits_longer(tiny_model, toy_data, toy_reward, length_reward, tmp_path):
    """A run with the adapter critic and critic.epochs 3 (two value-only epochs after the joint one): both
    adapters move, the checkpoint holds the policy's adapter and the critic's (critic/), run_info says one
    model in memory, and the critic-only epochs lower the value loss on the batch they fit."""
    sets = quick(tiny_model, toy_data, toy_reward, tmp_path / "a", **{
        "model.lora": "{enabled: true, r: 4, alpha: 8, target_modules: all-linear}", "ppo.kl_coef": 0.0,
        "ppo.critic.kind": "adapter", "ppo.critic.epochs": 3, "ppo.epochs": 1, "ppo.critic.lr": 1e-2,
        "rewards": length_reward, "steps": 3})
    result = train(load_config(None, sets), console=Console(quiet=True))
    info = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert (info["models_in_memory"], info["models_trained"]) == (1, 2)
    final = result.final_checkpoint
    policy = load_file(final / "adapter_model.safetensors")
    critic = load_file(final / "critic" / "adapter_model.safetensors")
    assert (final / "critic" / "value_head.safetensors").is_file()
    assert any(v.abs().sum() > 0 for k, v in policy.items() if "lora_B" in k)
    assert any(v.abs().sum() > 0 for k, v in critic.items() if "lora_B" in k)
    assert not any(torch.equal(policy[k], critic[k]) for k in policy if "lora_B" in k and k in critic)
    assert all(h["update_steps"] == 3 for h in result.history)  # one joint + two value-only optimizer steps
    assert any(h["value_loss_last"] < h["value_loss"] for h in result.history)
