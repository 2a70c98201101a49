"""The prompt-shared forward gives the same log-probs and gradients as every row carrying its prompt."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grouprl.logprobs import completion_logprobs, grouped_completion_logprobs, packed_completion_logprobs


def test_grouped_logprobs_and_gradients_equal_the_plain_forward():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    b, g, p, c = 2, 3, 5, 4
    prompt = torch.randint(3, 50, (b, p))
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding on the first prompt
    prompt[0, :2] = 0
    comp = torch.randint(3, 50, (b * g, c))
    comp_mask = torch.ones(b * g, c, dtype=torch.long)
    comp_mask[1, 2:] = 0  # a completion that ended early
    comp[1, 2:] = 0
    ids = torch.cat([prompt.repeat_interleave(g, 0), comp], 1)
    att = torch.cat([prompt_mask.repeat_interleave(g, 0), comp_mask], 1)
    m = comp_mask.float()

    plain = completion_logprobs(model, ids, att, c, temperature=0.7).logp
    (plain * m).sum().backward()
    plain_grads = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    grouped = grouped_completion_logprobs(model, prompt, prompt_mask, comp, comp_mask, g, temperature=0.7).logp
    (grouped * m).sum().backward()

    torch.testing.assert_close(grouped * m, plain * m, atol=1e-5, rtol=0)  # padding positions may differ
    for a, q in zip(plain_grads, model.parameters()):
        torch.testing.assert_close(q.grad, a, atol=1e-5, rtol=1e-4)


def test_packed_logprobs_entropy_hidden_and_gradients_equal_the_padded_forward():
    """All rows' real tokens in one sequence (position ids restarting per sequence): the same log-probs,
    entropies, hidden states and gradients as the padded batch, and zeros on padding."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    n, p, c = 4, 6, 5
    ids = torch.randint(3, 50, (n, p + c))
    att = torch.ones(n, p + c, dtype=torch.long)
    att[0, :3] = 0  # left padding
    att[2, :1] = 0
    att[1, p + 2:] = 0  # completions that ended early
    att[3, p + 4:] = 0
    ids[att == 0] = 0
    m = att[:, p:].float()
    outs, grads = [], []
    for fn in (completion_logprobs, packed_completion_logprobs):
        model.zero_grad()
        out = fn(model, ids, att, c, temperature=1.3, with_entropy=True, with_hidden=True)
        (out.logp * m).sum().backward()
        outs.append(out)
        grads.append([q.grad.clone() for q in model.parameters()])
    padded, packed = outs
    torch.testing.assert_close(packed.logp, padded.logp * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.entropy, padded.entropy * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.hidden, padded.hidden * m.unsqueeze(-1), atol=1e-5, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
