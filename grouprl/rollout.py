"""Sampling completions: the only module that generates. Produces a typed Rollout.

Layout of one batch of N = B * G sequences: row i answers prompt i // G. Prompts are left-padded to P
tokens, completions right-padded to C tokens, so every completion starts at column P.

`sample` is a KV-cached decoding loop with two savings over `model.generate` for GRPO's batches:
each prompt is prefilled once and its cache repeated for its G completions, and rows that have emitted
EOS leave the batch (their cache rows are dropped), so the cost follows the mean completion length
rather than the longest. The logits warpers (temperature, top-k, top-p) are transformers' own.
It is used on the CPU, where it measured 1.5x faster than `generate` (benchmarks/speed.py). On CUDA,
where a decode step is launch-bound rather than compute-bound, `model.generate` measured faster and is
used; so is it for models whose cache cannot be re-indexed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from grouprl.distributed import is_fsdp
from grouprl.logprobs import prefill_groups


class Rollout(NamedTuple):
    input_ids: Tensor  # (N, P + C) prompt tokens (left-padded) then completion tokens (right-padded)
    attention_mask: Tensor  # (N, P + C) 1 on real prompt tokens and on completion tokens through EOS
    completion_mask: Tensor  # (N, C) float: 1.0 on completion tokens through the first EOS
    truncated: Tensor  # (N,) bool: no EOS within max_new_tokens
    completions: list[str]  # N completion texts, the prefill included, special tokens removed
    prompt_index: list[int]  # N: index of the prompt (in the list given) each row answers
    group_size: int  # G: rows i*G .. i*G + G - 1 answer the same prompt
    temperature: float  # the sampling temperature, which the trainer's logprobs apply too

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    @property
    def lengths(self) -> Tensor:
        """(N,) tokens per completion through EOS."""
        return self.completion_mask.sum(1)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def completion_mask_from_ids(completion_ids: Tensor, eos: list[int]) -> tuple[Tensor, Tensor]:
    """(N, C) ids -> (mask (N, C) float: 1 through the first EOS, truncated (N,) bool: no EOS at all)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float(), ~is_eos.any(1)


@contextmanager
def lora_merged(model: PreTrainedModel):
    """On the CPU, fold a LoRA adapter into the base weights while generating (one matmul per linear layer
    instead of three). The merged weights are new tensors swapped in, with the adapter switched off, and the
    originals are swapped back after: unlike merge/unmerge, the frozen base never drifts by rounding, so a
    resumed run matches an uninterrupted one bit for bit. Costs one copy of the adapted weights while
    sampling; on CUDA (where sampling is bound by kernel launches) and under FSDP2 (whose weights are
    gathered views for the duration) nothing is merged."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer, Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    trainable = isinstance(model, PeftModel) and not model.peft_config[model.active_adapter].inference_mode
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not (layers and trainable and on_cpu and not is_fsdp(model) and all(isinstance(m, LoraLinear) for m in layers)):
        yield
        return
    swapped = []
    with torch.no_grad():
        for layer in layers:
            base = layer.get_base_layer()
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            swapped.append((base, base.weight.data))
            base.weight.data = base.weight.data + delta.to(base.weight.dtype)
    try:
        with model.disable_adapter():
            yield
    finally:
        for base, original in swapped:
            base.weight.data = original


def _warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    group_size: int,
    max_new_tokens: int,
    eos: list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    seeds: list[int] | None = None,
) -> Tensor | None:
    """prompt_ids, prompt_mask: (B, P) left-padded. Returns completion ids (B * G, C), C <= max_new_tokens,
    padded with pad_token_id after each row's EOS; None when the model's cache cannot be re-indexed.

    seeds: one per prompt. Each group then draws its tokens from its own generator, so a prompt's G
    completions do not depend on which other prompts share the batch: the same on one rank or split
    across eight (up to rounding in the logits). Without seeds, torch's global generator is used."""
    b, g = prompt_ids.shape[0], group_size
    device = prompt_ids.device
    cache, logits, key, _ = prefill_groups(model, prompt_ids, prompt_mask, g)  # one prefill per prompt
    if not (hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "batch_select_indices")):
        return None
    logits = logits.float()  # (N, V)
    attention = prompt_mask.repeat_interleave(g, 0)  # (n, P + t) for the rows still active
    position = attention.sum(-1, keepdim=True)  # (n, 1) position of the next token
    active = torch.arange(b * g, device=device)  # (n,) rows still generating
    tokens = torch.full((b * g, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    eos_t = torch.tensor(eos, device=device)
    warp = _warpers(temperature, top_k, top_p)
    gens = [torch.Generator(device).manual_seed(s) for s in seeds] if seeds is not None and not greedy else None
    steps = 0
    for t in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(warp(tokens[active, :t], logits), dim=-1)
            if gens is None:
                nxt = torch.multinomial(probs, 1).squeeze(1)
            else:  # group by group (rows are ordered by group): (n,)
                group = active // g
                nxt = torch.cat([torch.multinomial(probs[group == b], 1, generator=gens[b]).squeeze(1)
                                 for b in group.unique().tolist()])
        tokens[active, t] = nxt
        steps = t + 1
        keep = ~torch.isin(nxt, eos_t)
        if t == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():  # finished rows leave the batch
            idx = keep.nonzero().flatten()
            cache.batch_select_indices(idx)
            active, nxt, attention, position = active[idx], nxt[idx], attention[idx], position[idx]
        attention = torch.cat([attention, attention.new_ones(len(active), 1)], 1)
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=attention, position_ids=position, use_cache=True,
                    **{key: cache})
        cache = out.cache if key == "cache" else out.past_key_values
        position = position + 1
        logits = out.logits[:, -1].float()
    return tokens[:, :steps]


def pick_engine(engine: str, device: torch.device) -> str:
    """rollout.engine: 'auto' is grouprl's loop on the CPU (1.5x faster than generate there) and transformers'
    generate on CUDA (faster there: a decode step is launch-bound). A model whose cache cannot be re-indexed
    falls back to generate whatever the choice."""
    if engine == "auto":
        return "grouprl" if device.type == "cpu" else "hf"
    return engine


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    prefill: str = "",
    seeds: list[int] | None = None,
    device: torch.device | None = None,
    engine: str = "auto",
) -> Rollout:
    """Sample `group_size` completions for each chat-formatted prompt (which ends with `prefill`); with
    `seeds` (one per prompt), each group's draws come from its own generator (see `sample`). device: where
    the model computes (default: where its first parameter is). engine: see `pick_engine`."""
    device = device or next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = enc.input_ids.repeat_interleave(group_size, 0)  # (N, P)
    prompt_mask = enc.attention_mask.repeat_interleave(group_size, 0)
    was_training = model.training
    model.eval()
    eos = eos_ids(model, tokenizer)
    with lora_merged(model):
        completion_ids = None
        if pick_engine(engine, device) == "grouprl":
            completion_ids = sample(model, enc.input_ids, enc.attention_mask, group_size=group_size,
                                    max_new_tokens=max_new_tokens, eos=eos, pad_token_id=tokenizer.pad_token_id,
                                    temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, seeds=seeds)
        if completion_ids is None:
            # A complete GenerationConfig, so that the model's own defaults (a repetition penalty, say) do
            # not change the distribution that the logprobs and the KL assume.
            gen = GenerationConfig(do_sample=not greedy, temperature=1.0 if greedy else temperature, top_p=top_p,
                                   top_k=top_k, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos,
                                   pad_token_id=tokenizer.pad_token_id, use_cache=True)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen)
            completion_ids = out[:, prompt_ids.shape[1]:]  # (N, C)
    model.train(was_training)
    completion_mask, truncated = completion_mask_from_ids(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion_ids], 1),
        attention_mask=torch.cat([prompt_mask, completion_mask.long()], 1),
        completion_mask=completion_mask,
        truncated=truncated,
        completions=[prefill + t for t in texts],
        prompt_index=[i // group_size for i in range(len(prompts) * group_size)],
        group_size=group_size,
        temperature=temperature,
    )


def concat(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts of different P and C into one (used by dynamic sampling's refill)."""
    assert len({(r.group_size, r.temperature) for r in rollouts}) == 1
    if len(rollouts) == 1:
        return rollouts[0]
    p = max(r.input_ids.shape[1] - r.completion_len for r in rollouts)
    c = max(r.completion_len for r in rollouts)
    ids, att, cm = [], [], []
    offset, index = 0, []
    for r in rollouts:
        rp, rc = r.input_ids.shape[1] - r.completion_len, r.completion_len
        lp, rpad = p - rp, c - rc
        ids.append(torch.nn.functional.pad(r.input_ids, (lp, rpad), value=pad_token_id))
        att.append(torch.nn.functional.pad(r.attention_mask, (lp, rpad), value=0))
        cm.append(torch.nn.functional.pad(r.completion_mask, (0, rpad), value=0.0))
        index += [offset + i for i in r.prompt_index]
        offset += max(r.prompt_index) + 1
    return Rollout(
        input_ids=torch.cat(ids),
        attention_mask=torch.cat(att),
        completion_mask=torch.cat(cm),
        truncated=torch.cat([r.truncated for r in rollouts]),
        completions=[t for r in rollouts for t in r.completions],
        prompt_index=index,
        group_size=rollouts[0].group_size,
        temperature=rollouts[0].temperature,
    )


def select(r: Rollout, rows: Tensor) -> Rollout:
    """Keep the rows given by a (N,) bool mask or an index tensor."""
    idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
    keep = idx.tolist()
    return Rollout(
        input_ids=r.input_ids[idx],
        attention_mask=r.attention_mask[idx],
        completion_mask=r.completion_mask[idx],
        truncated=r.truncated[idx],
        completions=[r.completions[i] for i in keep],
        prompt_index=[r.prompt_index[i] for i in keep],
        group_size=r.group_size,
        temperature=r.temperature,
    )
