"""Rollout engines (grouprl/engines): the same greedy rollout from each; sampled tokens whose log-probs, as the
trainer recomputes them, are the engine's own; temperature, top-k and top-p honoured; auto's choice."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from grouprl import engines
from grouprl.logprobs import LAYOUTS, forward_groups
from grouprl.models import load_tokenizer
from grouprl.rollout import eos_ids, generate

PROMPTS = ["<|user|>say a 1<|end|><|assistant|>", "<|user|>a longer prompt than that<|end|><|assistant|>x",
           "<|user|>12+7=?<|end|><|assistant|>"]


def less_uniform(path, seed: int, eos_boost: float):
    """A tiny model with noise added to its weights and its EOS logit raised, so rows end at different steps."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = load_tokenizer(str(path))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.lm_head.weight[eos_ids(model, tok)[0]] += eos_boost
    return model, tok


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    return less_uniform(tiny_model, seed=2, eos_boost=0.5)


def _same(a, b):
    assert a.completions == b.completions
    c = min(a.completion_len, b.completion_len)  # one engine may pad to a longer row: compare the masks
    assert torch.equal(a.completion_mask[:, :c], b.completion_mask[:, :c])
    assert a.completion_mask[:, c:].sum() == 0 and b.completion_mask[:, c:].sum() == 0
    assert torch.equal(a.input_ids[:, :a.prompt_len + c], b.input_ids[:, :b.prompt_len + c])


@pytest.mark.parametrize("options", [{"engine": e} for e in engines.ENGINES if e != "grouprl"]
                         + [{"engine": "hf", "static_cache": True}])
def test_every_engine_gives_the_same_greedy_rollout(model_and_tok, options):
    model, tok = model_and_tok
    ref = generate(model, tok, PROMPTS, group_size=2, max_new_tokens=12, greedy=True, engine="grouprl")
    lengths = ref.lengths.tolist()
    assert len(set(lengths)) >= 3 and ref.truncated.any() and not ref.truncated.all(), lengths
    _same(generate(model, tok, PROMPTS, group_size=2, max_new_tokens=12, greedy=True, **options), ref)


def log_softmax_atol(model, ro) -> float:
    """How far two float32 log-softmaxes of the same float64 logits may differ, at the positions that score
    the rollout's tokens. Each side rounds the logits divided by the temperature to float32 (2 rounding
    errors u of |x| <= M, the largest of them), subtracts their maximum (4uM), and adds log sum exp of V
    terms in [0, 1] (4uM from its arguments, and (V + 4)u from the exponentials, their sum and the log).
    Twice that, for two sides."""
    mask = ro.attention_mask
    logits = model(ro.input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    scored = logits[:, ro.prompt_len - 1:-1][ro.completion_mask.bool()] / ro.temperature  # (tokens, V)
    u = torch.finfo(torch.float32).eps / 2
    return 2 * u * (8 * scored.abs().max().item() + scored.shape[-1] + 4)


@pytest.fixture(scope="module")
def model64(model_and_tok):
    """The same model in float64: two code paths then agree on its logits to ~1e-15 on any CPU, and the
    engine's and the trainer's log-probs differ only by their own float32 log-softmax, whose rounding is
    bounded above. In float32 the paths' different matmul kernels (a decode step against a full forward)
    differ by ~1e-5 in log-prob, by an amount that changes from one CPU to another."""
    import copy

    return copy.deepcopy(model_and_tok[0]).double(), model_and_tok[1]


@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_trainer_logprobs_equal_the_engines_own(model64, engine, temperature):
    """The trainer's recomputed log-probs (prompt-shared forward, at the rollout's temperature) are those of
    the distribution each engine sampled from."""
    model, tok = model64
    torch.manual_seed(0)
    ro = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=16, temperature=temperature, engine=engine,
                  with_logprobs=True)
    assert ro.logprobs.shape == ro.completion_mask.shape and ro.lengths.sum() > 20
    with torch.no_grad():
        atol = log_softmax_atol(model, ro)
        assert atol < 1e-4  # far below what a wrong temperature, token or position would change
        for layout in LAYOUTS:
            logp = forward_groups(model, ro, torch.arange(len(ro.completions)), layout=layout).logp
            torch.testing.assert_close(logp * ro.completion_mask, ro.logprobs, rtol=0, atol=atol)
    assert (ro.logprobs[ro.completion_mask == 0] == 0).all()
    assert ro.prefills == (4 if engine == "hf" else 1)  # grouprl's loop and cb fork G completions from one prefill


def test_prefills_count_what_the_engine_ran(model_and_tok, monkeypatch):
    """Sampling's token-passes count a prompt once per prefill: greedy cb sends G requests, and the loop's
    fallback to hf (a cache it cannot re-index, found after its own prefill) prefills every row again."""
    model, tok = model_and_tok
    greedy = {e: generate(model, tok, PROMPTS, group_size=3, max_new_tokens=4, greedy=True, engine=e).prefills
              for e in engines.ENGINES}
    assert greedy == {"grouprl": 1, "hf": 3, "cb": 3}
    from grouprl.engines import loop

    monkeypatch.setattr(loop, "sample", lambda *a, **k: None)
    assert generate(model, tok, PROMPTS, group_size=3, max_new_tokens=4, engine="grouprl").prefills == 4


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_top_k_and_top_p_are_honoured(model_and_tok, engine):
    """top_k=1, or a top_p small enough to keep one token, samples the greedy completion; and the engine's
    log-prob of a token it was forced to pick is 0."""
    model, tok = model_and_tok
    greedy = generate(model, tok, PROMPTS, group_size=3, max_new_tokens=12, greedy=True, engine="grouprl")
    for warp in ({"top_k": 1}, {"top_p": 1e-6}):
        torch.manual_seed(1)
        ro = generate(model, tok, PROMPTS, group_size=3, max_new_tokens=12, temperature=1.3, engine=engine,
                      with_logprobs=True, **warp)
        _same(ro, greedy)
        assert ro.logprobs.abs().max() < 1e-6


def test_cb_samples_the_same_after_the_same_seed_and_follows_a_lora_adapter(tiny_model):
    """Continuous batching is deterministic under torch's seed or the prompts' seeds (all requests are queued
    before its thread starts) and leaves torch's generator as it was; it samples from the adapted policy,
    merged for sampling like the grouprl engine. In float64, as above: the merged weights' rounding differs
    from the adapter's by an amount that changes from one CPU to another in float32."""
    from grouprl.config import LoraConfig, ModelConfig
    from grouprl.models import load_policy

    policy, tok = load_policy(ModelConfig(name_or_path=str(tiny_model), device="cpu",
                                          lora=LoraConfig(enabled=True, r=4)))
    policy.double()
    torch.manual_seed(3)  # the adapter drawn the same whichever tests ran before
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(generate(policy, tok, PROMPTS, group_size=4, max_new_tokens=12, engine="cb", with_logprobs=True))
        after = torch.rand(3)  # the call leaves torch's generator as it found it
    assert runs[0].completions == runs[1].completions
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)
    seeded = [generate(policy, tok, PROMPTS, group_size=4, max_new_tokens=12, engine="cb", seeds=[1, 2, 3]).completions
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # with the prompts' seeds, whatever the global generator's state
    ro = runs[0]
    with torch.no_grad():
        logp = forward_groups(policy, ro, torch.arange(len(ro.completions))).logp
        torch.testing.assert_close(logp * ro.completion_mask, ro.logprobs, rtol=0, atol=log_softmax_atol(policy, ro))
    greedy = [generate(policy, tok, PROMPTS, group_size=1, max_new_tokens=12, greedy=True, engine=e).completions
              for e in ("grouprl", "cb")]
    assert greedy[0] == greedy[1]
    with policy.disable_adapter():  # the adapter changes what is sampled, and disabled it is not merged in
        base = [generate(policy, tok, PROMPTS, group_size=1, max_new_tokens=12, greedy=True, engine=e).completions
                for e in ("grouprl", "cb", "hf")]
    assert base[0] == base[1] == base[2] != greedy[1]


def test_auto_picks_by_device_and_names_are_checked():
    assert engines.pick("auto", torch.device("cpu")) == "grouprl"
    assert engines.pick("auto", torch.device("cuda")) == "hf"
    assert engines.pick("cb", torch.device("cpu")) == "cb"
    with pytest.raises(ValueError, match="vllm"):
        engines.pick("vllm", torch.device("cpu"))


def test_draw_locates_a_uniform_in_the_cumulative_probabilities():
    """The grouprl engine's draw: intervals [0, .1) -> 0, none for the 0-probability token, [.1, .7) -> 2,
    [.7, 1) -> 3; over many rows the frequencies are the probabilities."""
    from grouprl.engines.loop import draw

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    for seed in range(20):
        u = torch.rand(1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).item()
        expected = 0 if u < 0.1 else 2 if u < 0.7 else 3
        assert draw(probs, torch.Generator().manual_seed(seed)).item() == expected, (seed, u)
    many = draw(probs.expand(40000, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount(many, minlength=4).float() / 40000
    assert freq[1] == 0 and (freq - probs[0]).abs().max() < 0.01, freq
    unnormalised = draw(torch.tensor([[2.0, 0.0, 0.0, 6.0]]).expand(20000, 4), torch.Generator().manual_seed(1))
    assert set(unnormalised.tolist()) == {0, 3} and abs((unnormalised == 3).float().mean() - 0.75) < 0.015
