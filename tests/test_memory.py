"""Micro-batches by a token budget and the out-of-memory back-off, with an out-of-memory error injected on the
CPU: a forward over more padded tokens than a made-up memory limit raises torch.OutOfMemoryError."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from grouprl import logprobs
from grouprl.config import GRPOConfig, ModelConfig, load_config
from grouprl.errors import UserError
from grouprl.microbatch import Budget, padded_tokens
from grouprl.rollout import Rollout
from tests.test_learning import toy_config


def fake_rollout(prompt_lens: list[int], completion_lens: list[int], g: int) -> Rollout:
    """Groups of g rows; group k's prompt has prompt_lens[k] real tokens, its rows completion_lens[k]."""
    p, c, n = max(prompt_lens), max(completion_lens), len(prompt_lens) * g
    att = torch.zeros(n, p + c, dtype=torch.long)
    for k, (pl, cl) in enumerate(zip(prompt_lens, completion_lens)):
        att[k * g:(k + 1) * g, p - pl:p + cl] = 1
    return Rollout(torch.ones(n, p + c, dtype=torch.long), att, att[:, p:].float(), torch.zeros(n, dtype=torch.bool),
                   [""] * n, [i // g for i in range(n)], g, 1.0)


def test_plan_sorts_longest_first_and_packs_within_the_budget():
    r = fake_rollout([3, 5, 2, 4], [10, 2, 6, 9], g=2)  # padded tokens of one group: 26, 14, 16, 26
    assert [padded_tokens(r, torch.tensor([k])) for k in range(4)] == [26, 14, 16, 26]
    # budget 52: {0, 3} = 4 rows x (4 + 10) = 56 > 52, so 0 alone; then {3, 2} = 4 x (4 + 9) = 52; then {1}
    plan = Budget(52).plan(r, torch.arange(4), groups_per_micro=2)
    assert [p.tolist() for p in plan] == [[0], [3, 2], [1]]
    assert [p.tolist() for p in Budget(None).plan(r, torch.arange(4), 3)] == [[0, 1, 2], [3]]
    assert [p.tolist() for p in Budget(10).plan(r, torch.arange(4), 2)] == [[0], [3], [2], [1]]  # groups whole


def test_halve():
    b = Budget(None)
    b.halve(100, smallest=20)
    assert b.tokens == 50 and b.metrics() == {"micro_batch_tokens": 50.0, "oom_backoffs": 1.0}
    b.halve(30, smallest=20)
    assert b.tokens == 20  # never below one group
    assert b.metrics() == {"micro_batch_tokens": 20.0, "oom_backoffs": 1.0} and b.metrics() == {"micro_batch_tokens": 20.0}
    with pytest.raises(UserError, match="out of memory on a micro-batch of one group .* a group cannot be split"):
        b.halve(20, smallest=20)


@pytest.fixture()
def memory_limit(monkeypatch):
    """Set limit[0] to the most padded tokens a forward may hold; past it, torch.OutOfMemoryError."""
    limit = [None]
    seen = []
    real = logprobs._forward_groups

    def forward(model, rollout, rows, *a, **k):
        tokens = rollout.attention_mask[rows].numel()
        seen.append(tokens)
        if limit[0] is not None and tokens > limit[0]:
            raise torch.OutOfMemoryError(f"injected: {tokens} tokens")
        return real(model, rollout, rows, *a, **k)

    monkeypatch.setattr(logprobs, "_forward_groups", forward)
    return limit, seen


def _step(tiny_model, budget: Budget, micro: int, mu: int = 2):
    from grouprl.grpo import grpo_update
    from grouprl.models import load_policy
    from grouprl.optim import Optim
    from grouprl.rollout import generate

    torch.manual_seed(0)
    policy, tok = load_policy(ModelConfig(name_or_path=str(tiny_model), device="cpu"))
    prompts = [f"<|user|>{'a' * (3 + 4 * i)}<|end|><|assistant|>" for i in range(4)]
    ro = generate(policy, tok, prompts, group_size=2, max_new_tokens=8, seeds=[1, 2, 3, 4])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, -1.0, 1.0])
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    optim = Optim(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0), list(policy.parameters()), 1.0)
    stats = grpo_update(policy, None, optim, ro, adv, GRPOConfig(beta=0.0, micro_batch_size=micro, mu=mu),
                        max_new_tokens=8, seed=3, budget=budget)
    return policy, stats


def test_out_of_memory_halves_the_budget_and_gives_the_same_step(tiny_model, memory_limit):
    from grouprl.logprobs import PASSES

    limit, seen = memory_limit
    PASSES.reset()
    plain, s0 = _step(tiny_model, Budget(None), micro=8)  # all 4 groups in one micro-batch
    passes = PASSES.forward, PASSES.backward
    PASSES.reset()
    whole = max(seen)
    seen.clear()
    limit[0] = whole // 2  # a micro-batch of all 4 groups no longer fits
    budget = Budget(None)
    backed_off, s1 = _step(tiny_model, budget, micro=8)
    assert budget.tokens is not None and budget.tokens <= whole // 2
    assert budget.metrics()["oom_backoffs"] >= 1
    assert any(s > limit[0] for s in seen)  # it failed once, then fitted
    assert (PASSES.forward, PASSES.backward) == passes  # the failed attempt's forwards are not counted
    assert s1.loss == pytest.approx(s0.loss, rel=1e-5, abs=1e-6)
    for a, b in zip(plain.parameters(), backed_off.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    # the budget, once lowered, is used from the start: no more failures
    seen.clear()
    _step(tiny_model, budget, micro=8)
    assert all(s <= limit[0] for s in seen)


def test_one_group_too_large_is_one_line(tiny_model, memory_limit):
    limit, _ = memory_limit
    limit[0] = 1
    with pytest.raises(UserError, match="out of memory on a micro-batch of one group"):
        _step(tiny_model, Budget(None), micro=8)


def test_probe_backs_off_before_step_one_and_the_budget_is_kept(tiny_model, toy_data, toy_reward, tmp_path,
                                                                 memory_limit):
    import io

    limit, seen = memory_limit
    limit[0] = 300  # one group of the longest (8 rows x 26 tokens) fits, the default two per micro-batch do not
    text = io.StringIO()
    out = tmp_path / "run"
    sets = toy_config(tiny_model, toy_data, toy_reward, out, steps=2, memory_probe="true", save_every=1)
    from grouprl.loop import train

    train(load_config(None, sets), console=Console(file=text, width=200))
    assert "memory probe:" in text.getvalue()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = rows[0]["micro_batch_tokens"]
    assert tokens <= limit[0] and "oom_backoffs" not in rows[0]  # backed off before step 1, not during it
    assert json.loads((out / "final" / "trainer_state.json").read_text())["micro_batch_tokens"] == tokens
