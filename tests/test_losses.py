"""GRPO loss pieces (ratios, clipped surrogate, k3 KL, aggregations, grpo_loss) and the log-prob helpers,
against numbers worked out by hand (DESIGN.md, "Reference math")."""

import math
from typing import get_args

import pytest
import torch
from torch.testing import assert_close

from grouprl.config import AggregationName
from grouprl.logprobs import entropy, selective_log_softmax
from grouprl.losses import (
    AGGREGATIONS,
    RATIOS,
    Normaliser,
    clipped_surrogate,
    constant_norm,
    grpo_loss,
    k3_kl,
    seq_mean_token_mean,
    sequence_ratio,
    token_mean,
    token_ratio,
)
from grouprl.rollout import completion_mask_from_ids

e = math.exp


def t(values, dtype=torch.float64, **kw):
    return torch.tensor(values, dtype=dtype, **kw)


# ---------------------------------------------------------------- ratios


def test_token_ratio():
    # rho = exp(logp - old): [exp(.5), exp(0), exp(-1)]
    logp = t([[-1.0, -2.0, -3.0]])
    old = t([[-1.5, -2.0, -2.0]])
    mask = t([[1.0, 1.0, 1.0]])
    assert_close(token_ratio(logp, old, mask), t([[e(0.5), 1.0, e(-1.0)]]), atol=1e-12, rtol=0)


def test_sequence_ratio_value():
    # row 0: logp - old = [.3, .1, (masked 5.0)], |o| = 2 -> mean .2 -> s = exp(.2) on every position
    # row 1: logp - old = [.6, -.3, 0], |o| = 3 -> mean .1 -> s = exp(.1)
    # row 2: no token counts -> the mean is 0 / clamp(0, min=1) = 0 -> s = 1
    logp = t([[-1.0, -2.0, -3.0], [-0.4, -1.3, -2.0], [-1.0, -1.0, -1.0]])
    old = t([[-1.3, -2.1, -8.0], [-1.0, -1.0, -2.0], [-9.0, -9.0, -9.0]])
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    s = sequence_ratio(logp, old, mask)
    expected = t([[e(0.2)] * 3, [e(0.1)] * 3, [1.0] * 3])
    assert_close(s, expected, atol=1e-12, rtol=0)


def test_sequence_ratio_gradient():
    # GSPO: s_i = exp((1/|o_i|) sum_t m_t (logp_t - old_t)), so ds_i/dlogp_t = s_i * m_t / |o_i|.
    # The token form s_{i,t} = sg[s_i] exp(logp_t - sg[logp_t]) averaged over the tokens of o_i must have
    # exactly that gradient:
    # row 0: s = exp(.2), |o| = 2 -> grad [exp(.2)/2, exp(.2)/2, 0]
    # row 1: s = exp(.1), |o| = 3 -> grad [exp(.1)/3] * 3
    logp = t([[-1.0, -2.0, -3.0], [-0.4, -1.3, -2.0]], requires_grad=True)
    old = t([[-1.3, -2.1, -8.0], [-1.0, -1.0, -2.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    s = sequence_ratio(logp, old, mask)
    ((s * mask).sum(1) / mask.sum(1)).sum().backward()
    expected = t([[e(0.2) / 2, e(0.2) / 2, 0.0], [e(0.1) / 3] * 3])
    assert_close(logp.grad, expected, atol=1e-12, rtol=0)

    # the same as autograd through the sequence-level definition of s_i
    logp2 = logp.detach().clone().requires_grad_(True)
    s_seq = (((logp2 - old) * mask).sum(1) / mask.sum(1)).exp()  # (N,)
    s_seq.sum().backward()
    assert_close(logp2.grad, expected, atol=1e-12, rtol=0)


def test_registry_matches_config_names():
    assert RATIOS == {"token": token_ratio, "sequence": sequence_ratio}
    assert set(AGGREGATIONS) == set(get_args(AggregationName))


# ---------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_both_sides_both_signs():
    # eps_low .2, eps_high .28 (DAPO clip-higher): clip range [.8, 1.28]
    # ratio            [.5,   .9,   1.0,  1.2,  1.5 ]
    # A = +2: rho A    [1.0,  1.8,  2.0,  2.4,  3.0 ];  clip(rho) A [1.6, 1.8, 2.0, 2.4, 2.56]
    #         min      [1.0,  1.8,  2.0,  2.4,  2.56]   clipped branch taken only at 1.5 (upper side)
    # A = -1: rho A    [-.5, -.9,  -1.0, -1.2, -1.5 ];  clip(rho) A [-.8, -.9, -1.0, -1.2, -1.28]
    #         min      [-.8, -.9,  -1.0, -1.2, -1.5 ]   clipped branch taken only at .5 (lower side)
    # A = 0: all zero, nothing clipped
    ratio = t([[0.5, 0.9, 1.0, 1.2, 1.5]] * 3, requires_grad=True)
    adv = t([2.0, -1.0, 0.0])
    obj, is_clipped = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28)
    expected = t([[1.0, 1.8, 2.0, 2.4, 2.56], [-0.8, -0.9, -1.0, -1.2, -1.5], [0.0] * 5])
    assert_close(obj, expected, atol=1e-12, rtol=0)
    assert is_clipped.dtype == torch.bool
    assert is_clipped.tolist() == [
        [False, False, False, False, True],
        [True, False, False, False, False],
        [False] * 5,
    ]
    # where the clipped branch is taken there is no gradient; elsewhere d obj / d rho = A
    obj.sum().backward()
    assert_close(ratio.grad, t([[2, 2, 2, 2, 0], [0, -1, -1, -1, -1], [0] * 5]), atol=1e-12, rtol=0)


def test_clipped_surrogate_pessimistic_side_not_clipped():
    # A > 0 and rho < 1 - eps: the min keeps rho A (the worse value), so it is NOT clipped;
    # A < 0 and rho > 1 + eps: likewise: (1.5)(-1) = -1.5 < (1.2)(-1) = -1.2 -> unclipped, gradient flows
    ratio = t([[0.1], [1.5]])
    obj, is_clipped = clipped_surrogate(ratio, t([1.0, -1.0]), eps_low=0.2, eps_high=0.2)
    assert_close(obj, t([[0.1], [-1.5]]), atol=1e-12, rtol=0)
    assert not is_clipped.any()


# ---------------------------------------------------------------- k3 KL


def test_k3_kl_hand_worked():
    # d = ref - logp = [0, 1, -.5, 2]
    # kl = e^d - d - 1 = [1 - 0 - 1 = 0, e - 2 = .71828, e^-.5 + .5 - 1 = .10653, e^2 - 3 = 4.38906]
    logp = t([[-1.0, -2.0, -0.5, -3.0]])
    ref = t([[-1.0, -1.0, -1.0, -1.0]])
    assert_close(k3_kl(logp, ref), t([[0.0, e(1) - 2, e(-0.5) - 0.5, e(2) - 3]]), atol=1e-12, rtol=0)


def test_k3_kl_nonnegative_and_gradient():
    g = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(4, 9, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = -3 * torch.rand(4, 9, generator=g, dtype=torch.float64)
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all()
    # d kl / d logp = 1 - exp(ref - logp)
    kl.sum().backward()
    assert_close(logp.grad, 1 - (ref - logp.detach()).exp(), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- aggregations


PER_TOKEN = [[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]  # |o_0| = 3, |o_1| = 2; the masked 4, 30, 40 must not count


def test_seq_mean_token_mean_hand_worked():
    # row means (1+2+3)/3 = 2 and (10+20)/2 = 15 -> (2 + 15) / 2 = 8.5
    out = seq_mean_token_mean(t(PER_TOKEN), t(MASK), Normaliser(num_seqs=2, num_tokens=5, max_len=4))
    assert_close(out, t(8.5), atol=1e-12, rtol=0)


def test_token_mean_hand_worked():
    # (1 + 2 + 3 + 10 + 20) / 5 = 36 / 5 = 7.2
    out = token_mean(t(PER_TOKEN), t(MASK), Normaliser(num_seqs=2, num_tokens=5, max_len=4))
    assert_close(out, t(7.2), atol=1e-12, rtol=0)


def test_constant_norm_hand_worked():
    # 36 / (N * L_max) = 36 / (2 * 4) = 4.5; with L_max = 6: 36 / 12 = 3
    out = constant_norm(t(PER_TOKEN), t(MASK), Normaliser(num_seqs=2, num_tokens=5, max_len=4))
    assert_close(out, t(4.5), atol=1e-12, rtol=0)
    out = constant_norm(t(PER_TOKEN), t(MASK), Normaliser(num_seqs=2, num_tokens=5, max_len=6))
    assert_close(out, t(3.0), atol=1e-12, rtol=0)


def test_aggregations_use_batch_normaliser_not_micro_batch_size():
    # one micro-batch (row 0 alone) of a 4-sequence, 10-token batch with L_max 5:
    # seq_mean_token_mean: 2 / 4 = .5;  token_mean: 6 / 10 = .6;  constant: 6 / (4 * 5) = .3
    norm = Normaliser(num_seqs=4, num_tokens=10, max_len=5)
    row, m = t(PER_TOKEN[:1]), t(MASK[:1])
    assert_close(seq_mean_token_mean(row, m, norm), t(0.5), atol=1e-12, rtol=0)
    assert_close(token_mean(row, m, norm), t(0.6), atol=1e-12, rtol=0)
    assert_close(constant_norm(row, m, norm), t(0.3), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["seq_mean_token_mean", "token_mean", "constant"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_micro_batches_add_up_to_the_batch(name, split):
    g = torch.Generator().manual_seed(1)
    n, tt = 5, 7
    per_token = torch.randn(n, tt, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 6, 2])
    mask = (torch.arange(tt).unsqueeze(0) < lengths.unsqueeze(1)).double()  # (N, T)
    norm = Normaliser(num_seqs=n, num_tokens=float(mask.sum()), max_len=tt)
    agg = AGGREGATIONS[name]
    whole = agg(per_token, mask, norm)
    parts = agg(per_token[:split], mask[:split], norm) + agg(per_token[split:], mask[split:], norm)
    assert_close(parts, whole, atol=1e-12, rtol=0)


def test_normaliser_of_counts_sequences_with_a_token():
    # rows: 3 tokens, none (a truncated completion under mask_truncated), 2 tokens
    # num_seqs = 2 (the empty row is not a sequence of the batch), num_tokens = 3 + 0 + 2 = 5
    mask = t([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    assert Normaliser.of(mask, max_len=4) == Normaliser(num_seqs=2, num_tokens=5.0, max_len=4)
    assert Normaliser.of(torch.zeros(2, 3), max_len=3) == Normaliser(num_seqs=0, num_tokens=0.0, max_len=3)


@pytest.mark.parametrize("name, expected", [("seq_mean_token_mean", 8.5), ("token_mean", 7.2), ("constant", 4.5)])
def test_fully_masked_sequence_is_as_if_absent(name, expected):
    # PER_TOKEN / MASK with a fully masked row of 100s slipped in between: every aggregation gives the numbers
    # of the two-row batch above, seq_mean_token_mean (2 + 0 + 15) / 2 = 8.5 (not / 3 = 5.67),
    # token_mean 36 / 5 = 7.2, constant 36 / (2 * 4) = 4.5 (not / (3 * 4) = 3)
    per_token = t([PER_TOKEN[0], [100.0] * 4, PER_TOKEN[1]])
    mask = t([MASK[0], [0, 0, 0, 0], MASK[1]])
    norm = Normaliser.of(mask, max_len=4)
    agg = AGGREGATIONS[name]
    assert_close(agg(per_token, mask, norm), t(expected), atol=1e-12, rtol=0)
    # micro-batches [row 0, masked row] + [row 2] still add up to it
    assert_close(agg(per_token[:2], mask[:2], norm) + agg(per_token[2:], mask[2:], norm), t(expected),
                 atol=1e-12, rtol=0)
    # a batch with every row masked gives 0, not 0 / 0
    assert agg(per_token, torch.zeros_like(mask), Normaliser.of(torch.zeros_like(mask), 4)).item() == 0.0


# ---------------------------------------------------------------- grpo_loss


def _example():
    """Two sequences, T = 3: |o_0| = 2 (last position masked), |o_1| = 3.

    logp - old = [[.1, -.5, (3.0 masked)], [0, .4, -.3]]
    ref - logp = [[0,  .5, (2.0 masked)], [-.5, 0, 1]]
    adv = [1, -.5]
    """
    logp = t([[-1.0, -0.5, -2.0], [-0.2, -1.5, -3.0]])
    old = t([[-1.1, 0.0, -5.0], [-0.2, -1.9, -2.7]])
    ref = t([[-1.0, 0.0, 0.0], [-0.7, -1.5, -2.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    adv = t([1.0, -0.5])
    return logp, old, ref, adv, mask


# Hand computation, eps_low = eps_high = .2 (clip range [.8, 1.2]), beta = .1:
# row 0, A = 1:   rho = [e^.1 = 1.105171, e^-.5 = .606531]; clip(rho) = [1.105171, .8]
#                 min(rho A, clip A) = [1.105171, .606531]  (A > 0 and rho < .8: unclipped, the worse value)
#                 kl = [e^0 - 0 - 1 = 0, e^.5 - .5 - 1 = .148721]
#                 L = [1.105171, .606531 - .1 * .148721 = .591659]      sum 1.696829
# row 1, A = -.5: rho = [1, e^.4 = 1.491825, e^-.3 = .740818]
#                 rho A = [-.5, -.745912, -.370409];  clip(rho) A = [-.5, -.6, -.4]
#                 min = [-.5, -.745912, -.4]   (third token: clipped branch, lower side)
#                 kl = [e^-.5 + .5 - 1 = .106531, 0, e - 1 - 1 = .718282]
#                 L = [-.5 - .0106531, -.745912, -.4 - .0718282]          sum -1.728394
ROW0 = e(0.1) + (e(-0.5) - 0.1 * (e(0.5) - 1.5))
ROW1 = (-0.5 - 0.1 * (e(-0.5) - 0.5)) + (-0.5 * e(0.4)) + (-0.5 * 0.8 - 0.1 * (e(1) - 2))


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        # -( 1.696829 / 2 + (-1.728394) / 3 ) / 2 = -(.848415 - .576131) / 2 = -.136142
        ("seq_mean_token_mean", -(ROW0 / 2 + ROW1 / 3) / 2),
        # -(1.696829 - 1.728394) / 5 = .006313
        ("token_mean", -(ROW0 + ROW1) / 5),
        # -(1.696829 - 1.728394) / (N * L_max = 2 * 3) = .005261
        ("constant", -(ROW0 + ROW1) / 6),
    ],
)
def test_grpo_loss_hand_worked(aggregation, expected):
    logp, old, ref, adv, mask = _example()
    norm = Normaliser(num_seqs=2, num_tokens=5, max_len=3)
    loss, stats = grpo_loss(
        logp, old, ref, adv, mask, norm, eps_low=0.2, eps_high=0.2, beta=0.1, aggregation=aggregation
    )
    assert_close(loss, t(expected), atol=1e-12, rtol=0)
    assert stats.tokens == 5
    assert stats.clipped == 1  # row 1, token 2
    # kl over counted tokens: 0 + .148721 + .106531 + 0 + .718282 = .973534
    assert stats.kl == pytest.approx((e(0.5) - 1.5) + (e(-0.5) - 0.5) + (e(1) - 2), abs=1e-12)
    assert stats.ratio == pytest.approx(e(0.1) + e(-0.5) + 1 + e(0.4) + e(-0.3), abs=1e-12)


def test_grpo_loss_numbers_rounded():
    # the same example, written as the rounded decimals of the comment above
    logp, old, ref, adv, mask = _example()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, Normaliser(2, 5, 3), eps_low=0.2, eps_high=0.2, beta=0.1)
    assert abs(loss.item() - (-0.136142)) < 1e-6


def test_grpo_loss_without_reference():
    # ref_logp None: no KL term whatever beta is, kl stat 0
    # row 0 sum e^.1 + e^-.5; row 1 sum -.5 - .5 e^.4 - .4 -> loss -(row0/2 + row1/3)/2
    logp, old, _, adv, mask = _example()
    loss, stats = grpo_loss(logp, old, None, adv, mask, Normaliser(2, 5, 3), eps_low=0.2, eps_high=0.2, beta=0.1)
    row0, row1 = e(0.1) + e(-0.5), -0.5 - 0.5 * e(0.4) - 0.4
    assert_close(loss, t(-(row0 / 2 + row1 / 3) / 2), atol=1e-12, rtol=0)
    assert stats.kl == 0.0


def test_grpo_loss_gradient_on_policy():
    # mu = 1: old = logp.detach() -> rho = 1, nothing clipped; ref = logp.detach() -> kl = 0 and d kl = 0.
    # loss = -(1/N) sum_i (1/|o_i|) sum_t rho_{i,t} A_i m_t  ->  d loss / d logp_{i,t} = -A_i m_t / (N |o_i|)
    # row 0: A = 1, |o| = 2 -> [-1/4, -1/4, 0];  row 1: A = -.5, |o| = 3 -> [.5/6] * 3 = [1/12] * 3
    logp0, _, _, adv, mask = _example()
    logp = logp0.clone().requires_grad_(True)
    loss, stats = grpo_loss(
        logp, logp.detach(), logp.detach(), adv, mask, Normaliser(2, 5, 3), eps_low=0.2, eps_high=0.2, beta=0.04
    )
    loss.backward()
    assert_close(logp.grad, t([[-0.25, -0.25, 0.0], [1 / 12] * 3]), atol=1e-12, rtol=0)
    assert stats.clipped == 0 and stats.kl == 0.0 and stats.ratio == 5.0


def test_grpo_loss_sequence_ratio_gradient():
    # GSPO with seq_mean_token_mean, beta 0, inside the clip range:
    # loss = -(1/N) sum_i s_i A_i -> d loss / d logp_{i,t} = -(1/N) A_i s_i m_t / |o_i|
    # logp - old: row 0 [.1, -.1, (masked)] -> s_0 = e^0 = 1; row 1 [.1, .05, -.03] -> s_1 = e^.04
    # grad row 0: -(1/2)(1)(1)/2 = -.25 on the 2 tokens; row 1: -(1/2)(-.5) e^.04 / 3 = e^.04 / 12
    logp = t([[-1.0, -0.5, -2.0], [-0.2, -1.5, -3.0]], requires_grad=True)
    old = logp.detach() - t([[0.1, -0.1, 2.0], [0.1, 0.05, -0.03]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    adv = t([1.0, -0.5])
    loss, stats = grpo_loss(
        logp, old, None, adv, mask, Normaliser(2, 5, 3), eps_low=0.2, eps_high=0.2, beta=0.0, ratio_type="sequence"
    )
    # loss = -(1 * 1 + (-.5) e^.04) / 2
    assert_close(loss, t(-(1 - 0.5 * e(0.04)) / 2), atol=1e-12, rtol=0)
    loss.backward()
    assert_close(logp.grad, t([[-0.25, -0.25, 0.0], [e(0.04) / 12] * 3]), atol=1e-12, rtol=0)
    assert stats.clipped == 0
    assert stats.ratio == pytest.approx(2 * 1 + 3 * e(0.04), abs=1e-12)


def test_grpo_loss_sequence_ratio_clips_whole_sequence():
    # s_0 = exp(mean(.5, .5)) = e^.5 = 1.6487 > 1.2 with A > 0: every token of o_0 takes the clipped branch,
    # so o_0 contributes 1.2 * A and no gradient; o_1 (s = 1) is untouched.
    logp = t([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    old = t([[-1.5, -1.5], [-1.0, -1.0]])
    mask = t([[1, 1], [1, 1]])
    loss, stats = grpo_loss(
        logp, old, None, t([1.0, 1.0]), mask, Normaliser(2, 4, 2), eps_low=0.2, eps_high=0.2, beta=0.0,
        ratio_type="sequence",
    )
    # loss = -(1.2 + 1) / 2 = -1.1
    assert_close(loss, t(-1.1), atol=1e-12, rtol=0)
    assert stats.clipped == 2
    loss.backward()
    # row 1: -(1/2) * 1 * 1 / 2 = -.25 per token
    assert_close(logp.grad, t([[0.0, 0.0], [-0.25, -0.25]]), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- log-probs


def exact_log_softmax(logits, targets):
    """The targets' log-softmax in float64, and how far a float32 one of the same logits (N, T, V) may be
    from it: x_t - logsumexp(x) rounds logsumexp's arguments and result (4uM for M = max|x|), its V
    exponentials, their sum and the log ((V + 4)u), and the difference (u|logp| <= u(2M + log V)): in all
    less than u(8M + 2V + 8)."""
    x = logits.double()
    m, v = x.abs().max().item(), x.shape[-1]
    u = torch.finfo(torch.float32).eps / 2
    return torch.log_softmax(x, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1), u * (8 * m + 2 * v + 8)


@pytest.mark.parametrize("chunk", [1, 2, 4, 16])
def test_selective_log_softmax_matches_log_softmax(chunk):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 7, 11, generator=g)
    targets = torch.randint(0, 11, (5, 7), generator=g)
    expected, atol = exact_log_softmax(logits, targets)
    out = selective_log_softmax(logits, targets, chunk=chunk)
    assert out.shape == (5, 7) and out.dtype == torch.float32
    assert_close(out.double(), expected, atol=atol, rtol=0)


def test_selective_log_softmax_low_precision_input_gives_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 6, (3, 4), generator=g)
    out = selective_log_softmax(logits, targets)
    assert out.dtype == torch.float32
    expected, atol = exact_log_softmax(logits, targets)  # of the bf16 values, exactly: no bf16 rounding added
    assert_close(out.double(), expected, atol=atol, rtol=0)


def test_selective_log_softmax_hand_worked():
    # logits [0, 0, ln 2]: logsumexp = ln(1 + 1 + 2) = ln 4; logp(token 2) = ln 2 - ln 4 = -ln 2; token 0: -ln 4
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]])
    out = selective_log_softmax(logits, torch.tensor([[2, 0]]))
    assert_close(out, torch.tensor([[-math.log(2), -math.log(4)]]), atol=1e-6, rtol=0)


def test_entropy_uniform_and_peaked():
    # uniform over 8 -> ln 8; all mass on one token (a huge logit) -> 0
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 3] = 1e4
    assert_close(entropy(logits), torch.tensor([[math.log(8), 0.0]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- completion mask


def test_completion_mask_from_ids():
    eos = [2]
    ids = torch.tensor([
        [5, 6, 2, 7, 2],  # EOS in the middle (and again later): counted through the first EOS
        [5, 6, 7, 8, 2],  # EOS at the very end
        [5, 6, 7, 8, 9],  # no EOS: truncated, every token counts
        [2, 2, 2, 2, 2],  # EOS first (pad = EOS afterwards)
    ])
    mask, truncated = completion_mask_from_ids(ids, eos)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]
    assert truncated.tolist() == [False, False, True, False]


def test_completion_mask_several_eos_ids():
    # eos ids 2 and 3: whichever comes first ends the completion
    ids = torch.tensor([[5, 3, 2, 0], [4, 4, 4, 2], [4, 4, 4, 4]])
    mask, truncated = completion_mask_from_ids(ids, [2, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
