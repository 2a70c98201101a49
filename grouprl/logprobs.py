"""Per-token log-probabilities of completions, by selective log-softmax.

logp(o_t) = logit[o_t] - logsumexp(logits): a gather and a logsumexp, computed chunk by chunk over the
sequences, so no (N, T, V) log_softmax copy is ever made. The model computes logits only for the
completion positions (`logits_to_keep`), not for the prompt.

The G completions of a group share one prompt, so `grouped_completion_logprobs` runs the prompt once per
group, repeats its key/value cache G times (autograd flows through the repeat), and runs only the
completion tokens per sequence: with an 85-token prompt, 48-token completions and G = 8, that is 2.3x
fewer tokens through the model, forward and backward, with the same values and gradients.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from grouprl.distributed import unwrap

if TYPE_CHECKING:
    from grouprl.rollout import Rollout


def selective_log_softmax(logits: Tensor, targets: Tensor, chunk: int = 4) -> Tensor:
    """logits (N, T, V), targets (N, T) -> logp (N, T) in float32, `chunk` sequences at a time."""
    out = []
    for lg, tg in zip(logits.split(chunk), targets.split(chunk)):
        lg = lg.float()
        out.append(lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out)


def entropy(logits: Tensor, chunk: int = 4, grad: bool = False) -> Tensor:
    """Entropy of the next-token distribution, (N, T, V) -> (N, T). Without `grad` (metrics) no graph is
    kept; with it (an entropy bonus in the loss) the gradient flows to the logits."""
    if grad and torch.is_grad_enabled():  # recomputed in backward: no (chunk, T, V) float32 tensors kept
        from torch.utils.checkpoint import checkpoint

        return torch.cat([checkpoint(_entropy, lg, use_reentrant=False) for lg in logits.split(chunk)])
    with torch.no_grad():
        return torch.cat([_entropy(lg) for lg in logits.split(chunk)])


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of the model's forward: 'cache' (transformers >= 5.x) or 'past_key_values'."""
    model = getattr(model, "module", model)  # under a DDP wrapper
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def prefill_groups(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int,
                   with_hidden: bool = False):
    """Run each of the B left-padded prompts once and repeat its KV cache G times (differentiably).

    Returns (cache for N = B * G rows, last-position logits (N, V), the cache argument's name, last-position
    final hidden state (N, H) or None).
    """
    key = cache_kwarg(model)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=1,
                position_ids=(prompt_mask.long().cumsum(-1) - 1).clamp(min=0), output_hidden_states=with_hidden)
    cache = out.cache if key == "cache" else out.past_key_values
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(group_size)  # (B, ...) -> (N, ...)
    hidden = out.hidden_states[-1][:, -1].repeat_interleave(group_size, 0) if with_hidden else None
    return cache, out.logits[:, -1].repeat_interleave(group_size, 0), key, hidden


class TokenLogprobs(NamedTuple):
    logp: Tensor | None  # (N, C) logp of each completion token (None when not asked for)
    entropy: Tensor | None  # (N, C) next-token entropy, when asked for
    hidden: Tensor | None = None  # (N, C, H) final hidden state at the position that predicts each token


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_logp: bool = True,
    with_hidden: bool = False,
) -> TokenLogprobs:
    """logp of the last `completion_len` tokens of each row given everything before them.

    input_ids, attention_mask: (N, P + C), prompts left-padded, completions right-padded.
    Logits are divided by the sampling temperature so that logp is that of the distribution sampled from.
    with_hidden also returns the final hidden states at the same positions (for a value head); without
    with_logp, the vocabulary projection is skipped (logits for one position only).
    """
    c = completion_len
    # Positions follow the mask so that left padding does not shift them (as generate() does).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=c + 1 if with_logp else 1,
        use_cache=False,
        output_hidden_states=with_hidden,
    )
    hidden = out.hidden_states[-1][:, -c - 1:-1] if with_hidden else None  # (N, C, H)
    if not with_logp:
        return TokenLogprobs(None, None, hidden)
    logits = out.logits[:, :-1]  # (N, C, V): position t predicts token t + 1
    if temperature != 1.0:
        logits = logits.float() / temperature  # divide in float32, not in the model's bf16
    logp = selective_log_softmax(logits, input_ids[:, -c:])
    return TokenLogprobs(logp, entropy(logits, grad=with_entropy == "grad") if with_entropy else None, hidden)


def grouped_completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_logp: bool = True,
    with_hidden: bool = False,
) -> TokenLogprobs:
    """Like `completion_logprobs`, with the prompt computed once per group.

    prompt_ids, prompt_mask: (B, P) left-padded, one row per group; completion_ids, completion_mask:
    (N, C) with N = B * G, rows of group b at b*G .. b*G + G - 1.
    """
    g = group_size
    cache, last, key, last_hidden = prefill_groups(model, prompt_ids, prompt_mask, g, with_hidden)
    c = completion_ids.shape[1]
    lengths = prompt_mask.long().sum(-1).repeat_interleave(g).unsqueeze(1)  # (N, 1)
    attention = torch.cat([prompt_mask.repeat_interleave(g, 0), completion_mask.to(prompt_mask.dtype)], 1)
    out = model(input_ids=completion_ids, attention_mask=attention,
                position_ids=lengths + torch.arange(c, device=lengths.device), use_cache=True,
                logits_to_keep=c if with_logp else 1, output_hidden_states=with_hidden, **{key: cache})
    hidden = None
    if with_hidden:  # (N, C, H): the prompt's last position predicts o_0, completion position t predicts o_t+1
        hidden = torch.cat([last_hidden.unsqueeze(1), out.hidden_states[-1][:, :-1]], 1)
    if not with_logp:
        return TokenLogprobs(None, None, hidden)
    logits = torch.cat([last.unsqueeze(1), out.logits[:, :-1]], 1)  # (N, C, V)
    if temperature != 1.0:
        logits = logits.float() / temperature  # divide in float32, not in the model's bf16
    logp = selective_log_softmax(logits, completion_ids)
    return TokenLogprobs(logp, entropy(logits, grad=with_entropy == "grad") if with_entropy else None, hidden)


def packed_completion_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_logp: bool = True,
    with_hidden: bool = False,
) -> TokenLogprobs:
    """Like `completion_logprobs`, with no padding: the real tokens of all N rows are packed into one row and
    the position ids restart at 0 for each sequence, from which transformers builds a block-diagonal causal
    mask (flash attention takes the sequence boundaries instead and needs no mask). Logits are computed only
    at the positions that predict a completion token. Results come back in the (N, C) padded layout, 0 on
    padding."""
    c = completion_len
    real = attention_mask.bool()
    lengths = real.sum(1)  # (N,) prompt + completion tokens through EOS
    comp = real[:, -c:].sum(1)  # (N,) completion tokens
    starts = torch.cumsum(lengths, 0) - lengths  # (N,) each sequence's first column in the packed row
    packed = input_ids[real].unsqueeze(0)  # (1, T): row-major, so sequence after sequence
    position_ids = torch.cat([torch.arange(n, device=input_ids.device) for n in lengths.tolist()]).unsqueeze(0)
    slot = torch.arange(c, device=input_ids.device)
    keep = slot.unsqueeze(0) < comp.unsqueeze(1)  # (N, C) the completion tokens
    # the position predicting completion token j of row i: its start + prompt length + j - 1
    where = (starts + lengths - comp - 1).unsqueeze(1) + slot  # (N, C)
    at = where[keep]  # (K,) in packed order
    out = model(input_ids=packed, attention_mask=None, position_ids=position_ids, use_cache=False,
                logits_to_keep=at if with_logp else 1, output_hidden_states=with_hidden)

    def unpack(x: Tensor) -> Tensor:  # (K, ...) -> (N, C, ...), zeros on padding
        full = x.new_zeros(*keep.shape, *x.shape[1:])
        full[keep] = x
        return full

    hidden = unpack(out.hidden_states[-1][0, at]) if with_hidden else None
    if not with_logp:
        return TokenLogprobs(None, None, hidden)
    logits = out.logits[0].unsqueeze(1)  # (K, 1, V)
    if temperature != 1.0:
        logits = logits.float() / temperature
    targets = packed[0, at + 1].unsqueeze(1)  # (K, 1)
    logp = unpack(selective_log_softmax(logits, targets, chunk=256).squeeze(1))
    return TokenLogprobs(logp, unpack(entropy(logits, chunk=256, grad=with_entropy == "grad").squeeze(1)) if with_entropy else None, hidden)


# Rollout-level helpers: rows come in groups of G that share a prompt; batches are made of whole groups.

LAYOUTS = ("shared", "packed", "padded")


def attention(model: torch.nn.Module) -> str | None:
    """The attention implementation transformers runs the model with ('sdpa', 'flash_attention_2', ...)."""
    return getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)


def pick_layout(layout: str, checkpointing: bool, attention: str | None) -> str:
    """model.update_layout 'auto': shared (on the CPU 2-2.4x faster than padded: benchmarks/layouts.py). Under
    activation checkpointing, where a recomputed block would append the shared prompt's cache twice: packed
    with flash attention (varlen kernels: no mask, no work across sequences), else padded. Without flash
    attention a packed row gets a dense block-diagonal mask and the attention of the whole row, measured 3x
    slower than padded on the CPU."""
    if layout != "auto":
        return layout
    if not checkpointing:
        return "shared"
    return "packed" if (attention or "").startswith("flash") else "padded"


def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """Group indices (k,) -> the indices of their rows (k * G,), group by group."""
    return (groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()


class TokenPasses:
    """Real (non-pad) tokens run through a model by `forward_groups` since `reset`: `forward` counts every
    call, `backward` the calls made with gradient (each is followed by its backward pass). The equal-compute
    axis of `grouprl compare`: counted where the forwards happen, so a learner's count is what it ran."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._forward: list[Tensor] = []
        self._backward: list[Tensor] = []

    def add(self, tokens: Tensor) -> None:
        """tokens: a 0-d count on the model's device (read only at the end: no device sync per forward)."""
        self._forward.append(tokens)
        if torch.is_grad_enabled():
            self._backward.append(tokens)

    def mark(self) -> tuple[int, int]:
        return len(self._forward), len(self._backward)

    def rewind(self, mark: tuple[int, int]) -> None:
        """Forget what was counted since `mark` (an attempt that ran out of memory and is run again)."""
        del self._forward[mark[0]:], self._backward[mark[1]:]

    @property
    def forward(self) -> float:
        return float(sum(t.item() for t in self._forward))

    @property
    def backward(self) -> float:
        return float(sum(t.item() for t in self._backward))


PASSES = TokenPasses()


def trimmed(rollout: Rollout, rows: Tensor) -> Rollout:
    """The rows of the rollout without the columns that are padding in every one of them (left of the
    longest prompt, right of the longest completion): the same forward, fewer tokens. Outputs come back to
    the rollout's width through `widen`."""
    p = rollout.prompt_len
    att = rollout.attention_mask[rows]
    p0 = int(att[:, :p].any(0).float().argmax())  # the first column that holds a prompt token of some row
    c = max(1, int(att[:, p:].sum(1).max()))
    return rollout._replace(input_ids=rollout.input_ids[rows, p0:p + c], attention_mask=att[:, p0:p + c],
                            completion_mask=rollout.completion_mask[rows, :c], truncated=rollout.truncated[rows],
                            completions=[], prompt_index=[], logprobs=None, turn_rewards=None)


def widen(out: TokenLogprobs, width: int) -> TokenLogprobs:
    """Outputs of a trimmed forward, (n, c, ...) zero-padded on the right to (n, width, ...)."""
    def pad(x: Tensor | None) -> Tensor | None:
        if x is None or x.shape[1] == width:
            return x
        return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])], 1)
    return TokenLogprobs(pad(out.logp), pad(out.entropy), pad(out.hidden))


def forward_groups(model, rollout: Rollout, rows: Tensor, with_entropy: bool | str = False, layout: str = "shared",
                   with_logp: bool = True, with_hidden: bool = False) -> TokenLogprobs:
    """As `_forward_groups`, on the rows with their all-padding columns cut off (`trimmed`), the outputs
    padded back to the rollout's completion width."""
    sub = trimmed(rollout, rows)
    out = _forward_groups(model, sub, torch.arange(len(rows), device=rows.device), with_entropy, layout, with_logp,
                          with_hidden)
    return widen(out, rollout.completion_len)


def _forward_groups(model, rollout: Rollout, rows: Tensor, with_entropy: bool | str = False, layout: str = "shared",
                    with_logp: bool = True, with_hidden: bool = False) -> TokenLogprobs:
    """Log-probs (n, C) at the rollout's temperature (and optionally hidden states (n, C, H)) of the
    completions in `rows` (whole groups, from group_rows). with_entropy: True for the entropy as a metric,
    "grad" for an entropy that the loss differentiates (an entropy bonus). layout: 'shared' runs each prompt once per group;
    'packed' packs the rows' real tokens into one sequence; 'padded' runs every row whole, padding included.
    The real tokens it runs are added to PASSES."""
    g, p, temperature = rollout.group_size, rollout.prompt_len, rollout.temperature
    if layout == "shared":
        heads = rows[::g]
        PASSES.add(rollout.attention_mask[heads, :p].sum() + rollout.attention_mask[rows, p:].sum())
        return grouped_completion_logprobs(
            model, rollout.input_ids[heads, :p], rollout.attention_mask[heads, :p], rollout.input_ids[rows, p:],
            rollout.attention_mask[rows, p:], g, temperature, with_entropy, with_logp, with_hidden)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    PASSES.add(rollout.attention_mask[rows].sum())
    fn = packed_completion_logprobs if layout == "packed" else completion_logprobs
    return fn(model, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.completion_len, temperature,
              with_entropy, with_logp, with_hidden)
