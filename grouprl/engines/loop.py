"""The grouprl engine: a KV-cached decoding loop with two savings over `model.generate` for GRPO's batches.
Each prompt is prefilled once and its cache repeated for its G completions, and rows that have emitted EOS
leave the batch (their cache rows are dropped), so the cost follows the mean completion length rather than
the longest. The logits warpers (temperature, top-k, top-p) are transformers' own.

Episodes of several turns keep each row's cache (params.keep_cache: Sampled.kept, a row's keys and values
without its padding) when the row stops, and `resume` starts the next turn from it: the rows' caches
right-aligned in one batch, their new tokens (the reply and the template's tokens, of different lengths)
right-aligned after a masked gap, with positions that continue each row's own. Prefilling the history
again each turn costs O(k^2) tokens over k turns; this reads each token once.

With seeds (one per prompt), each group draws its tokens from its own generator, so a prompt's G
completions do not depend on which other prompts share the batch: the same in one process or split
across eight ranks (up to rounding in the logits). Without seeds, torch's global generator is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from grouprl.engines import SamplingParams, Sampled
from grouprl.logprobs import cache_kwarg, prefill_groups


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of probs (n, V) by inverse CDF: one uniform per row, located in the cumulative
    probabilities (float64, so a token's interval is its probability to 1e-16). `torch.multinomial` draws one
    exponential per vocabulary entry instead, which was 16% of a CPU decode step at a 49k vocabulary. A
    token of probability 0 has an empty interval and is never drawn."""
    cdf = probs.double().cumsum(-1)  # (n, V)
    if not torch.isfinite(cdf[:, -1]).all():
        raise FloatingPointError("the model's next-token probabilities are not finite (NaN or inf in its logits)")
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


@dataclass
class Kept:
    """One row's KV cache at the end of its turn: per layer (keys, values), each (heads, T, head_dim), of the
    T tokens it has read (padding dropped: each key carries its position already), in order."""
    layers: list[tuple[Tensor, Tensor]]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[1]

    def crop(self, length: int) -> Kept:
        return Kept([(k[:, :length], v[:, :length]) for k, v in self.layers])


def _keepable(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _take(cache, attention: Tensor, rows: Tensor) -> list[Kept]:
    """The Kept of the given batch rows of a DynamicCache whose positions attention (n, T) marks."""
    out = []
    for r in rows.tolist():
        valid = attention[r].bool()
        out.append(Kept([(layer.keys[r][:, valid], layer.values[r][:, valid]) for layer in cache.layers]))
    return out


@torch.no_grad()
def sample(model, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams) -> Sampled | None:
    """None when the model's cache cannot be re-indexed (the caller then uses generate)."""
    cache, logits, key, _ = prefill_groups(model, prompt_ids, prompt_mask, params.group_size)  # one per prompt
    if not (hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "batch_select_indices")):
        return None
    return _decode(model, cache, key, logits.float(), prompt_mask.repeat_interleave(params.group_size, 0), params)


@torch.no_grad()
def resume(model, kept: list[Kept], chunks: list[list[int]], params: SamplingParams) -> Sampled:
    """The next turn of each row from its kept cache: prefill only its new tokens (`chunks`: the reply and
    the template's tokens, and any sampled token the cache has not read), then decode as `sample` does, one
    row per group (params.group_size 1)."""
    device = kept[0].layers[0][0].device
    width, new = max(k.length for k in kept), max(len(c) for c in chunks)
    cache = DynamicCache(ddp_cache_data=[(_left_padded([k.layers[i][0] for k in kept]),
                                          _left_padded([k.layers[i][1] for k in kept]))
                                         for i in range(len(kept[0].layers))])
    attention = torch.zeros(len(kept), width + new, dtype=torch.long, device=device)
    ids = torch.full((len(kept), new), params.pad_token_id, dtype=torch.long, device=device)
    position = torch.zeros(len(kept), new, dtype=torch.long, device=device)
    for i, (k, c) in enumerate(zip(kept, chunks)):  # the chunk right-aligned too: a masked gap before it
        attention[i, width - k.length:width] = 1
        attention[i, width + new - len(c):] = 1
        ids[i, new - len(c):] = torch.tensor(c, device=device)
        position[i, new - len(c):] = torch.arange(k.length, k.length + len(c), device=device)
    key = cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=attention, position_ids=position, use_cache=True, logits_to_keep=1,
                **{key: cache})
    cache = out.cache if key == "cache" else out.past_key_values
    return _decode(model, cache, key, out.logits[:, -1].float(), attention, params)


def _left_padded(parts: list[Tensor]) -> Tensor:
    """Rows' (heads, T_i, head_dim) keys or values as one (n, heads, T, head_dim), each right-aligned."""
    return pad_sequence([p.transpose(0, 1) for p in parts], batch_first=True, padding_side="left").transpose(1, 2)


def _decode(model, cache, key: str, logits: Tensor, attention: Tensor, params: SamplingParams) -> Sampled:
    """Sample from the last-position logits (N, V) of a cache over attention (N, T), G rows per group."""
    g, c_max, device = params.group_size, params.max_new_tokens, logits.device
    n = logits.shape[0]
    keep_cache = params.keep_cache and _keepable(cache)
    kept: list[Kept | None] = [None] * n
    position = attention.sum(-1, keepdim=True)  # (n, 1) position of the next token
    active = torch.arange(n, device=device)  # (n,) rows still generating
    tokens = torch.full((n, c_max), params.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, c_max, device=device) if params.with_logprobs else None
    eos_t = torch.tensor(params.eos, device=device)
    warp = warpers(params.temperature, params.top_k, params.top_p)
    gens = None
    if params.seeds is not None and not params.greedy:
        gens = [torch.Generator(device).manual_seed(s) for s in params.seeds]
    steps = 0
    for t in range(c_max):
        scores = logits if params.greedy else warp(tokens[active, :t], logits)
        if params.greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(scores, dim=-1)
            if gens is None:
                nxt = draw(probs)
            else:  # group by group (rows are ordered by group): (n,)
                group = active // g
                nxt = torch.cat([draw(probs[group == k], gens[k]) for k in group.unique().tolist()])
        tokens[active, t] = nxt
        if logprobs is not None:
            logprobs[active, t] = torch.log_softmax(scores, -1).gather(1, nxt.unsqueeze(1)).squeeze(1)
        steps = t + 1
        keep = ~torch.isin(nxt, eos_t)
        if t == c_max - 1 or not keep.any():
            if keep_cache:  # the rows still here: their cache has read all but the token just drawn
                for r, k in zip(active.tolist(), _take(cache, attention, torch.arange(len(active)))):
                    kept[r] = k
            break
        if not keep.all():  # finished rows leave the batch
            if keep_cache:
                done = (~keep).nonzero().flatten()
                for r, k in zip(active[done].tolist(), _take(cache, attention, done)):
                    kept[r] = k
            idx = keep.nonzero().flatten()
            cache.batch_select_indices(idx)
            active, nxt, attention, position = active[idx], nxt[idx], attention[idx], position[idx]
        attention = torch.cat([attention, attention.new_ones(len(active), 1)], 1)
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=attention, position_ids=position, use_cache=True,
                    **{key: cache})
        cache = out.cache if key == "cache" else out.past_key_values
        position = position + 1
        logits = out.logits[:, -1].float()
    return Sampled(tokens[:, :steps], None if logprobs is None else logprobs[:, :steps], prefills=1,
                   kept=kept if keep_cache else None)
