"""Models of a published shape with random weights, for speed figures where no weights can be downloaded
(a GPU machine without network): speed depends on the shape, not on the values. The tokenizer is the
embedded model's (its ids all fall inside these vocabularies).

    from shapes import SHAPES, random_model_folder
    folder = random_model_folder("qwen2.5-0.5b", Path("/tmp/qwen-shape"))  # then model.name_or_path=folder
"""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab): the published configs' shapes
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064),
}


def random_model(name: str, dtype: torch.dtype = torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, i, layers, heads, kv, vocab = SHAPES[name]
    cfg = Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=h < 2048, dtype=dtype)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(dtype)


def random_model_folder(name: str, folder: Path) -> Path:
    """A loadable folder (config, random safetensors weights, the embedded tokenizer), written once."""
    if (folder / "config.json").is_file():
        return folder
    from grouprl.config import EMBEDDED_MODEL
    from grouprl.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(EMBEDDED_MODEL))
    model = random_model(name)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
