"""Entropy control: the covariance remedies (Clip-Cov, KL-Cov) and the entropy bonus, worked by hand, and on
the tiny model: the bonus raises the entropy, the remedies' tokens do not depend on how the batch is cut."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl.config import EntropyConfig, GRPOConfig, ModelConfig, load_config
from grouprl.entropy import clip_cov_select, count, kl_cov_select, select_tokens, token_covariance
from grouprl.logprobs import entropy
from grouprl.losses import EntropyControl, Normaliser, grpo_loss, policy_objective, ppo_policy_loss

# Three real tokens: logp -1, -3 (sequence 0, A = 1) and -2 (sequence 1, A = -1); one masked-out slot.
LOGP = torch.tensor([[-1.0, -3.0], [-2.0, -9.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
ADV = torch.tensor([1.0, -1.0])


def test_token_covariance_hand_worked():
    # mean A = 1/3, mean logp = -2: (2/3)(1), (2/3)(-1), (-4/3)(0); the masked slot is 0
    cov = token_covariance(LOGP, ADV, MASK)
    assert torch.allclose(cov, torch.tensor([[2 / 3, -2 / 3], [0.0, 0.0]]))
    # per-token advantages (PPO) give the same when they equal the broadcast ones
    assert torch.allclose(token_covariance(LOGP, ADV.unsqueeze(1).expand(2, 2), MASK), cov)


def test_count_is_a_fraction_of_the_tokens_at_least_one():
    assert count(2e-4, MASK) == 1
    assert count(0.7, MASK) == 2  # int(0.7 * 3) = 2
    assert count(1.0, torch.ones(10, 100)) == 1000


def test_kl_cov_picks_the_largest_covariance():
    cov = token_covariance(LOGP, ADV, MASK)
    assert kl_cov_select(cov, MASK, 0.3).tolist() == [[True, False], [False, False]]
    # two of three: the top two real tokens; the masked slot (cov 0, like token (1, 0)) is never taken
    assert kl_cov_select(cov, MASK, 0.7).tolist() == [[True, False], [True, False]]


def test_clip_cov_draws_only_inside_the_bounds():
    cov = torch.tensor([[0.5, 2.0, 3.0, 7.0], [1.5, 1.0, 4.0, 2.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # 2.5 is masked out
    inside = {(0, 1), (0, 2), (1, 0), (1, 2)}  # strictly between 1 and 5, unmasked (1.0 is on the bound)
    for seed in range(20):
        picked = clip_cov_select(cov, mask, 0.3, 1.0, 5.0, torch.Generator().manual_seed(seed))
        where = {tuple(i) for i in picked.nonzero().tolist()}
        assert len(where) == 2 and where <= inside  # int(0.3 * 7) = 2
    again = clip_cov_select(cov, mask, 0.3, 1.0, 5.0, torch.Generator().manual_seed(3))
    assert torch.equal(again, clip_cov_select(cov, mask, 0.3, 1.0, 5.0, torch.Generator().manual_seed(3)))
    # fewer candidates than the count: all of them
    assert clip_cov_select(cov, mask, 1.0, 1.0, 5.0, torch.Generator()).sum() == 4
    assert select_tokens("none", LOGP, ADV, MASK, ratio=0.5, bounds=(1.0, 5.0), seed=0) is None


def test_kl_cov_objective_hand_worked():
    # rho = 1.5 (logp = ln 1.5, old 0), A = 1. Unselected: rho A unclipped = 1.5 (clipped PPO would give 1.2);
    # selected: 1.5 - 1 * |ln 1.5| = 1.0945
    logp = torch.full((1, 2), math.log(1.5))
    old = torch.zeros(1, 2)
    control = EntropyControl("kl_cov", torch.tensor([[True, False]]), kl_cov_coef=1.0)
    obj, clipped = policy_objective(logp.exp(), logp, old, torch.tensor([1.0]), 0.2, 0.2, control)
    assert torch.allclose(obj, torch.tensor([[1.5 - math.log(1.5), 1.5]]))
    assert not clipped.any()
    plain, was_clipped = policy_objective(logp.exp(), logp, old, torch.tensor([1.0]), 0.2, 0.2, EntropyControl())
    assert torch.allclose(plain, torch.tensor([[1.2, 1.2]])) and was_clipped.all()


def test_clip_cov_takes_the_selected_tokens_out_of_the_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    control = EntropyControl("clip_cov", torch.tensor([[False, True]]))
    loss, stats = grpo_loss(logp, old, None, torch.tensor([2.0]), torch.ones(1, 2), Normaliser(1, 2.0, 2),
                            eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="token_mean", control=control)
    loss.backward()
    # d/dlogp of -(rho A)/2 at rho = 1 is -A/2 = -1 on the kept token, 0 on the selected one
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.0)  # only the kept token's rho A = 2, over 2 tokens
    assert stats.remedied == 1.0


def test_entropy_bonus_hand_worked():
    # two tokens of one sequence, entropies ln 2 and ln 4, A = 0: loss = -0.1 * mean(ln 2, ln 4) = -0.1 * 1.5 ln 2
    ent = torch.tensor([[math.log(2), math.log(4)]])
    control = EntropyControl(coef=0.1, entropy=ent)
    loss, _ = grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2),
                        Normaliser(1, 2.0, 2), eps_low=0.2, eps_high=0.2, beta=0.0, control=control)
    assert loss.item() == pytest.approx(-0.1 * 1.5 * math.log(2))
    ploss, _ = ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                               Normaliser(1, 2.0, 2), 0.2, control)
    assert ploss.item() == pytest.approx(-0.1 * 1.5 * math.log(2))


def test_differentiable_entropy_gradient():
    # two logits (a, 0): H = ln(1 + e^a) - a sigma(a); dH/da = -a sigma(a)(1 - sigma(a)), -0.19661 at a = 1
    logits = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    h = entropy(logits, grad=True)
    s = torch.sigmoid(torch.tensor(1.0))
    assert h.item() == pytest.approx(math.log(1 + math.e) - s.item())
    h.sum().backward()
    assert logits.grad[0, 0, 0].item() == pytest.approx(-(s * (1 - s)).item())
    assert not entropy(logits).requires_grad  # the metric keeps no graph


def test_entropy_config_validates():
    cfg = load_config(None, ["entropy.coef=0.01", "entropy.remedy=kl_cov", "entropy.cov_ratio=0.002", "grpo.mu=2"])
    assert cfg.entropy.remedy == "kl_cov" and cfg.entropy.coef == 0.01
    from grouprl.errors import UserError
    with pytest.raises(UserError, match="entropy.remedy"):
        load_config(None, ["entropy.remedy=cov"])


def _update(tiny_model, entropy_cfg: EntropyConfig, micro: int, steps: int = 1, adv=None, mu: int = 1):
    from grouprl.grpo import grpo_update
    from grouprl.models import load_policy
    from grouprl.optim import Optim
    from grouprl.rollout import generate

    torch.manual_seed(0)
    policy, tok = load_policy(ModelConfig(name_or_path=str(tiny_model), device="cpu"))
    policy.double()  # two micro-batchings then round alike on any CPU, and so pick the same remedied tokens
    ro = generate(policy, tok, ["<|user|>a<|end|><|assistant|>", "<|user|>b<|end|><|assistant|>"], group_size=4,
                  max_new_tokens=6, seeds=[1, 2])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.0, -1.0]) if adv is None else adv
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)  # not Adam: it would blow round-off up to lr * sign
    optim = Optim(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0), list(policy.parameters()), 1.0)
    stats = [grpo_update(policy, None, optim, ro, adv, GRPOConfig(beta=0.0, micro_batch_size=micro, mu=mu),
                         max_new_tokens=6, seed=7, entropy=entropy_cfg) for _ in range(steps)]
    return policy, stats


@pytest.mark.parametrize("remedy", ["kl_cov", "clip_cov"])
def test_remedy_tokens_do_not_depend_on_the_micro_batches(tiny_model, remedy):
    """Picked once over the batch from pi_old: micro-batches of one group or of both give the same step, and it
    is not the step without the remedy. KL-Cov's |log rho| has no gradient on the first pass (rho = 1): it acts
    from the second (mu = 2)."""
    cfg = EntropyConfig(remedy=remedy, cov_ratio=0.2, clip_cov_bounds=(-10.0, 10.0))
    mu = 2 if remedy == "kl_cov" else 1
    whole, s1 = _update(tiny_model, cfg, micro=8, mu=mu)
    split, s2 = _update(tiny_model, cfg, micro=4, mu=mu)
    assert s1[0].remedied == pytest.approx(s2[0].remedied) and s1[0].remedied > 0.1
    for a, b in zip(whole.parameters(), split.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    plain, _ = _update(tiny_model, EntropyConfig(), micro=8, mu=mu)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(whole.parameters(), plain.parameters()))


def test_entropy_bonus_raises_the_entropy_of_the_tiny_model(tiny_model):
    """With no reward signal at all (A = 0), the bonus alone moves the policy, toward higher entropy."""
    zero = torch.zeros(8)
    _, with_bonus = _update(tiny_model, EntropyConfig(coef=1.0), micro=8, steps=6, adv=zero)
    assert with_bonus[-1].entropy > with_bonus[0].entropy + 0.01, [s.entropy for s in with_bonus]
    _, without = _update(tiny_model, EntropyConfig(), micro=8, steps=2, adv=zero)
    assert without[0].loss is None  # no signal and no bonus: no step at all


def test_kl_cov_on_policy_only_grpo_is_refused():
    from grouprl.errors import UserError
    with pytest.raises(UserError, match="kl_cov needs off-policy passes"):
        load_config(None, ["entropy.remedy=kl_cov"])
    assert load_config(None, ["entropy.remedy=kl_cov", "grpo.mu=2"]).grpo.mu == 2
    assert load_config(None, ["entropy.remedy=kl_cov", "algo=ppo"]).algo == "ppo"  # 4 epochs
