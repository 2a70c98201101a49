"""Tokens per second of each rollout engine at G = 8 with fixed-length completions, beside the device's decode
roofline, so the table says how far each engine is from the limit.

    python benchmarks/engines.py [--model embedded|tiny|qwen2.5-0.5b|qwen2.5-1.5b] [--prompts 4] [--group-size 8]
                                 [--tokens 48] [--repeats 3] [--engines grouprl,hf,hf-static,cb] [--device cpu|cuda]
                                 [--out FILE.json] [--smoke]

The prompts are the default task's chat prompts. EOS is switched off, so every engine produces exactly
prompts x G x tokens tokens and the rates compare like for like. Engines run in turn within each repeat
(after one warm-up call each), and the median time counts. `qwen2.5-*` are models of that shape with
random weights (no download): speed depends on the shape, not on the values.

The roofline of one decode step over N rows: it reads every weight once and each row's KV cache, and does
2 x parameters FLOPs per token, so

    tokens/s <= N / max(bytes read / bandwidth, N x FLOPs per token / peak FLOP/s)

with the bandwidth (a large tensor copy) and the peak (a large matmul in the model's dtype) measured on this
device, and the KV cache at its mean length over the completion. Prefill is counted in the engine's time,
not in the roofline (it is a small part at 48+ tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grouprl.config import ModelConfig, TaskConfig  # noqa: E402
from grouprl.engines import SamplingParams, sample  # noqa: E402
from grouprl.models import load_policy, pick_dtype  # noqa: E402
from grouprl.tasks import build_task  # noqa: E402
from shapes import SHAPES, random_model  # noqa: E402

ENGINES = {"grouprl": ("grouprl", {}), "hf": ("hf", {}), "hf-static": ("hf", {"static_cache": True}),
           "hf-compile": ("hf", {"static_cache": True, "compile": True}), "cb": ("cb", {})}


def build_model(name: str, device: torch.device, folder: Path):
    if name in SHAPES:  # the embedded tokenizer (prompts only) and a random model of the shape
        from grouprl.config import EMBEDDED_MODEL
        from grouprl.models import load_tokenizer, resolve_model_path
        tok = load_tokenizer(resolve_model_path(EMBEDDED_MODEL))
        return random_model(name, pick_dtype("auto", device)).to(device).eval(), tok
    path = "embedded:smollm2-135m-instruct"
    if name == "tiny":
        from conftest import make_tiny_model
        path = str(make_tiny_model(folder / "tiny"))
    model, tok = load_policy(ModelConfig(name_or_path=path, device=device.type))
    return model.eval(), tok


def measured_bandwidth(device: torch.device, mib: int = 512) -> float:
    """Bytes per second of a large copy (read + write), best of 5."""
    a = torch.empty(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


def measured_flops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        a @ a
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def roofline(model, rows: int, context: float, bandwidth: float, flops: float) -> dict:
    c = model.config
    itemsize = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * itemsize  # tied embeddings counted once
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * itemsize
    bytes_per_step = weights + rows * context * kv_per_token
    flops_per_token = 2 * sum(p.numel() for n, p in model.named_parameters() if "embed" not in n or c.tie_word_embeddings)
    seconds = max(bytes_per_step / bandwidth, rows * flops_per_token / flops)
    return {"tokens_per_s": rows / seconds, "bound": "memory" if bytes_per_step / bandwidth >= rows * flops_per_token / flops
            else "compute", "weights_gib": weights / 2**30, "kv_bytes_per_token": kv_per_token}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded", choices=["embedded", "tiny", *SHAPES],
                    help="the embedded SmolLM2-135M, the tiny test model, or a published shape with random weights")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="grouprl,hf,hf-static,cb")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="the tiny test model, 2 prompts x G 4 x 8 tokens, once")
    a = ap.parse_args()
    if a.smoke:
        a.model, a.prompts, a.group_size, a.tokens, a.repeats = "tiny", 2, 4, 8, 1
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build_model(a.model, device, Path(tmp))
    task = build_task(TaskConfig())
    prompts = [task.chat_prompt(tok, r, "<reasoning>\n") for r in task.train[:a.prompts]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    never = (model.config.vocab_size + 7,)  # an EOS no model emits: every completion runs to --tokens
    params = SamplingParams(group_size=a.group_size, max_new_tokens=a.tokens, eos=never, pad_token_id=tok.pad_token_id)
    names = a.engines.split(",")
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.repeats + 1):  # round 0 is the warm-up
        for n in names:
            engine, options = ENGINES[n]
            torch.manual_seed(r)
            _sync(device)
            t = time.perf_counter()
            out = sample(engine, model, enc.input_ids, enc.attention_mask, params.__class__(**{**params.__dict__, **options}))
            _sync(device)
            if r:
                seconds[n].append(time.perf_counter() - t)
            assert out.completion_ids.shape == (a.prompts * a.group_size, a.tokens), (n, out.completion_ids.shape)
    rows = a.prompts * a.group_size
    prompt_len = enc.attention_mask.sum(1).float().mean().item()
    dtype = next(model.parameters()).dtype
    bandwidth, flops = measured_bandwidth(device), measured_flops(device, dtype)
    roof = roofline(model, rows, prompt_len + a.tokens / 2, bandwidth, flops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    result = {"model": a.model, "device": device_name, "dtype": str(dtype).removeprefix("torch."), "rows": rows,
              "prompt_tokens_mean": prompt_len, "completion_tokens": a.tokens, "bandwidth_gb_s": bandwidth / 1e9,
              "peak_tflop_s": flops / 1e12, "roofline": roof, "engines": {}}
    print(f"{a.model} ({result['dtype']}) on {device_name}: {a.prompts} prompts x G {a.group_size} x {a.tokens} "
          f"tokens; measured {bandwidth / 1e9:.1f} GB/s, {flops / 1e12:.2f} TFLOP/s; decode roofline "
          f"{roof['tokens_per_s']:.0f} tokens/s ({roof['bound']}-bound)\n")
    print("| engine | median time | tokens/s | roofline / engine |\n|---|---|---|---|")
    for n in names:
        t = statistics.median(seconds[n])
        rate = rows * a.tokens / t
        result["engines"][n] = {"seconds": seconds[n], "median_s": t, "tokens_per_s": rate,
                                "x_from_roofline": roof["tokens_per_s"] / rate}
        print(f"| {n} | {t:.2f} s | {rate:.0f} | {roof['tokens_per_s'] / rate:.1f}x |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
