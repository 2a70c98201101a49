"""Memory per rank of the model states (weights, gradients, AdamW moments) under DDP and FSDP2, full
fine-tuning and LoRA, for three Qwen2.5 sizes: the table in docs/distributed.md, computed, not measured.

    python benchmarks/memory.py [--world 8] [--lora-r 16]

P parameters, L LoRA parameters (r x (in + out) for every linear layer of every block), W ranks:
    DDP,   full FT, bf16 weights         8 P         (2 weights + 2 gradients + 2 x 2 AdamW moments in bf16)
    DDP,   full FT, fp32 + bf16 compute 16 P         (4 + 4 + 2 x 4)
    FSDP2, full FT                       as DDP / W, plus one gathered block (2 x block) while it runs
    DDP,   LoRA                          2 P + 16 L  (bf16 frozen base; adapters, gradients, moments in fp32)
    FSDP2, LoRA                          (2 P + 16 L) / W, plus one gathered block
Sampling under FSDP2 gathers the whole model once (2 P) for the duration of the rollout (see
distributed.gathered). Activations and the KV cache come on top (docs/distributed.md gives their formula).
A full-FT reference (beta > 0) adds 2 P (DDP) or 2 P / W (FSDP2); a separate PPO critic doubles the states.
"""

from __future__ import annotations

import argparse

# Shapes from the models' config.json (Hugging Face Qwen/Qwen2.5-*): hidden, intermediate, layers, heads,
# kv heads, vocab, tied embeddings
SHAPES = {
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, False),
}


def counts(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, r: int):
    """(P, L, one block's parameters)."""
    head_dim = hidden // heads
    linears = [(hidden, hidden), (hidden, kv * head_dim), (hidden, kv * head_dim), (hidden, hidden),
               (hidden, inter), (hidden, inter), (inter, hidden)]  # q k v o gate up down
    block = sum(i * o for i, o in linears) + hidden + 2 * kv * head_dim + 2 * hidden  # q/k/v biases, 2 norms
    embed = vocab * hidden * (1 if tied else 2)
    total = layers * block + embed + hidden
    lora = layers * sum(r * (i + o) for i, o in linears)
    return total, lora, block


def gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def table(world: int, r: int) -> str:
    rows = [f"| model | P | L (r={r}) | DDP full bf16 | DDP full fp32 master | FSDP2 full fp32 master, W={world} "
            f"| DDP LoRA | FSDP2 LoRA, W={world} | FSDP2 sampling adds |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, shape in SHAPES.items():
        p, lora, block = counts(*shape, r)
        gathered = 2 * block * 4  # one block's fp32 weights gathered for its forward
        rows.append(f"| {name} | {p / 1e9:.2f}B | {lora / 1e6:.1f}M | {gib(8 * p)} | {gib(16 * p)} | "
                    f"{gib(16 * p / world + gathered)} | {gib(2 * p + 16 * lora)} | "
                    f"{gib((2 * p + 16 * lora) / world + 2 * block * 2)} | {gib(2 * p)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=16)
    a = ap.parse_args()
    print(f"GiB per rank for weights, gradients and AdamW moments (no activations, no KV cache); W={a.world}")
    print(table(a.world, a.lora_r))
