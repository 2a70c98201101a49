"""The sampling loop: same greedy tokens as transformers' generate, groups, EOS handling, masks."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from grouprl.models import load_tokenizer
from grouprl.engines import SamplingParams
from grouprl.engines.loop import sample
from grouprl.rollout import concat, eos_ids, generate, select


def test_greedy_sample_matches_hf_generate(tiny_model):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = load_tokenizer(str(tiny_model))
    prompts = ["<|user|>say a 1<|end|><|assistant|>", "<|user|>hello there, how are you<|end|><|assistant|>",
               "<|user|>x<|end|><|assistant|>", "<|user|>12+7=?<|end|><|assistant|>"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = eos_ids(model, tok)
    with torch.no_grad():  # a less uniform model, and EOS likely enough that rows finish at different steps
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.lm_head.weight[eos[0]] += 0.5
    ours = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(
        group_size=1, max_new_tokens=24, eos=tuple(eos), pad_token_id=tok.pad_token_id, greedy=True)).completion_ids
    ref = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    ref = ref[:, enc.input_ids.shape[1]:]
    lengths = []
    for a, b in zip(ours.tolist(), ref.tolist()):
        assert a[:len(b)] == b and all(t == tok.pad_token_id for t in a[len(b):])
        lengths.append(next((i + 1 for i, t in enumerate(a) if t in eos), len(a)))
    assert len(set(lengths)) >= 3, lengths  # rows left the batch at different steps


def test_generate_groups_masks_and_prefill(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = load_tokenizer(str(tiny_model))
    ro = generate(model, tok, ["<|user|>a<|end|><|assistant|>", "<|user|>bb<|end|><|assistant|>x"], group_size=3,
                  max_new_tokens=8, prefill="x")
    n, c = 6, ro.completion_len
    assert ro.input_ids.shape == (n, ro.prompt_len + c) and ro.completion_mask.shape == (n, c)
    assert ro.prompt_index == [0, 0, 0, 1, 1, 1]
    assert all(t.startswith("x") for t in ro.completions)
    # rows of a group share their prompt tokens
    assert torch.equal(ro.input_ids[0, :ro.prompt_len], ro.input_ids[2, :ro.prompt_len])
    # the completion part of the attention mask is the completion mask
    assert torch.equal(ro.attention_mask[:, ro.prompt_len:].float(), ro.completion_mask)
    # truncated rows have no EOS; finished rows end at their EOS
    eos = eos_ids(model, tok)
    for i in range(n):
        length = int(ro.completion_mask[i].sum())
        has_eos = ro.input_ids[i, ro.prompt_len + length - 1].item() in eos
        assert has_eos != bool(ro.truncated[i])
    both = concat([ro, select(ro, torch.tensor([True, True, True, False, False, False]))], tok.pad_token_id)
    assert both.input_ids.shape[0] == 9 and both.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_lora_merged_sampling_matches_the_adapter_and_leaves_the_base_exact(tiny_model):
    """Sampling with the adapter folded in gives the logits of the unmerged adapter, and the frozen base
    weights come back bit for bit (merge/unmerge in place would move them by rounding)."""
    import torch

    from grouprl.config import LoraConfig, ModelConfig
    from grouprl.models import load_policy
    from grouprl.rollout import lora_merged

    policy, _ = load_policy(ModelConfig(name_or_path=str(tiny_model), device="cpu",
                                          lora=LoraConfig(enabled=True, r=4)))
    policy.double()  # merged (W + BA) and unmerged (Wx + B(Ax)) then round alike to ~1e-15 on any CPU
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "base_layer" in n}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        unmerged = policy(ids).logits
        with lora_merged(policy):
            merged = policy(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(p, base[n]) for n, p in policy.named_parameters() if "base_layer" in n)
