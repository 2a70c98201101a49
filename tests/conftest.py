"""Shared fixtures: a tiny random Llama with a character-level tokenizer, saved once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The suite runs the same on any machine and in any order: before torch, rich or sympy is imported, and for
# every process a test starts. FORCE_COLOR would colour even a pipe's text. The suite is defined on the CPU,
# in one thread (as a torchrun rank of its tests has), and sympy in pure Python (a signal can cut its
# factorials short, as rewards expect). COLUMNS is set in pytest_configure, below.
os.environ.update(TTY_COMPATIBLE="0", CUDA_VISIBLE_DEVICES="", SYMPY_GROUND_TYPES="python")
for name in ("LINES", "FORCE_COLOR"):
    os.environ.pop(name, None)

import pytest  # noqa: E402
import torch  # noqa: E402

THREADS = 1
torch.set_num_threads(THREADS)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """rich wraps a line at COLUMNS, else at a terminal's width, else at 80: a console wider than any message
    keeps each message on one line whatever the terminal and the temporary path's length. pytest's own report
    keeps the width it found (its writer is made by now, and pinned here)."""
    if config.pluginmanager.has_plugin("terminalreporter"):
        writer = config.get_terminal_writer()
        writer.fullwidth = writer.fullwidth
    os.environ["COLUMNS"] = "10000"


@pytest.fixture(autouse=True)
def same_threads():
    """A run's `threads` setting sets torch's thread count for the process: put it back after each test."""
    yield
    torch.set_num_threads(THREADS)


CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,?+-=\n<>/")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


TOOL_CHARS = list('{}":_()*[]|\'!')  # what tool calls and their results need, beyond CHARS


def make_tiny_model(path: Path, layers: int = 2, hidden: int = 64, seed: int = 0, tools: bool = False) -> Path:
    """tools: a vocabulary that can write tool calls (TOOL_CHARS) and a <|tool|> role token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<unk>"] + (["<|tool|>"] if tools else [])
    vocab = {t: i for i, t in enumerate(special + CHARS + (TOOL_CHARS if tools else []))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|end|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": special[2:5] + special[6:]})
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048 if tools else 512, pad_token_id=0, eos_token_id=vocab["<|end|>"],
                      bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = vocab["<|end|>"]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def read_dcp(folder: Path) -> dict:
    """A checkpoint's dcp/ (trained weights and optimizer states) as a flat {dotted name: value} dict."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), f"{tmp}/state.pt")
        state = torch.load(f"{tmp}/state.pt", weights_only=False)

    def walk(x, prefix=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], x
    return dict(walk(state))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tool_tok(tool_model):
    from grouprl.models import load_tokenizer

    return load_tokenizer(str(tool_model))


@pytest.fixture(scope="session")
def tool_lm(tool_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tool_model).eval()


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory) -> Path:
    """The tiny model with a vocabulary for tool calls and a tool role."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-tools") / "model", tools=True)


def write_toy_data(path: Path) -> Path:
    """A JSONL dataset of short prompts with an 'answer' column."""
    rows = [{"prompt": f"say a {i}", "answer": str(i % 10)} for i in range(64)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_toy_reward(path: Path) -> Path:
    """User reward file: the fraction of 'a' among the generated characters (dense, easy to climb)."""
    path.write_text(
        "def frac_a(prompts, completions, answer, **kw):\n"
        "    return [c.count('a') / max(len(c), 1) for c in completions]\n"
        "def raises(prompts, completions, **kw):\n"
        "    raise RuntimeError('boom')\n"
        "def nan(prompts, completions, **kw):\n"
        "    return [float('nan')] * len(completions)\n"
        "def short(prompts, completions, **kw):\n"
        "    return [1.0]\n"
    )
    return path


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_data(tmp_path_factory.mktemp("data") / "toy.jsonl")


@pytest.fixture(scope="session")
def toy_reward(tmp_path_factory) -> Path:
    return write_toy_reward(tmp_path_factory.mktemp("rewards") / "toy_reward.py")
