"""The PPO critic V(s_t): a scalar head on a causal LM's final hidden state, at every completion position.

V_t is read at the position that predicts completion token o_t (the last prompt position for o_0), the same
positions whose logits give logp(o_t), so values line up with the policy's (N, C) log-probs.

    kind 'separate'  a value model of its own: the policy's backbone (or another checkpoint) plus the head,
                     its own optimizer and learning rate, LoRA optional. Two models trained.
    kind 'adapter'   a second LoRA adapter ('critic') on the policy's own frozen base, plus the head, its own
                     optimizer: one copy of the base in memory, two trained adapters. V is a forward of the
                     policy's model with the critic adapter active (peft multi-adapter).
    kind 'head'      the head sits on the policy's trunk: one forward gives logp and V, one model in memory;
                     the value loss also trains the shared trunk (weighted by vf_coef).

Checkpoints: <dir>/critic/ (HF folder or peft adapter, plus value_head.safetensors) for 'separate' and
'adapter' (peft writes a second adapter to <dir>/<its name>/); <dir>/value_head.safetensors for 'head'.
A 'separate' critic can start from a saved critic/ folder.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from grouprl.checkpoint import export_pretrained, export_state, load_weights, on_main
from grouprl.config import DistributedConfig, TrainConfig
from grouprl.distributed import unwrap, wrap
from grouprl.logprobs import TokenLogprobs, forward_groups
from grouprl.models import add_lora, checkpoint_activations, load_causal_lm, peft_lora_config, resolve_model_path
from grouprl.rollout import Rollout

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_ADAPTER = "critic"  # the adapter's name, and so (peft) its folder in a checkpoint


@contextmanager
def active_adapter(model: nn.Module, name: str):
    """Run a peft model with adapter `name` active, every LoRA weight left trainable. (peft's set_adapter, and
    leaving disable_adapter(), freeze every adapter but the active one; a weight frozen before the backward
    of a graph that used it gets no gradient, so both adapters are made trainable again on the way in and out.)"""
    peft_model = unwrap(model)
    lora = [q for n, q in peft_model.named_parameters() if "lora_" in n]
    before = peft_model.active_adapter
    peft_model.set_adapter(name)
    for q in lora:
        q.requires_grad_(True)
    try:
        yield
    finally:
        peft_model.set_adapter(before)
        for q in lora:
            q.requires_grad_(True)


class ValueHead(nn.Module):
    """hidden (N, T, H) -> V (N, T) in float32. Zero-initialised: V = 0 until the critic has learned."""

    def __init__(self, hidden_size: int, device: torch.device):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def _hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.hidden_size


class Critic:
    """V(s_t) over a rollout's completion positions; `model` is the policy itself for kinds 'adapter' and
    'head' (`shared`: the head reads the policy's own hidden states)."""

    def __init__(self, model: nn.Module, head: ValueHead, kind: str):
        self.model, self.head, self.kind = model, head, kind
        self.shared = kind == "head"

    def parameters(self) -> list[nn.Parameter]:
        """What the critic's optimizer trains: the head, plus the value model's trainable weights when separate,
        or the critic adapter (a shared trunk is trained by the policy's optimizer)."""
        if self.kind == "separate":
            own = [p for p in self.model.parameters() if p.requires_grad]
        elif self.kind == "adapter":
            own = [p for n, p in unwrap(self.model).named_parameters() if f".{CRITIC_ADAPTER}." in n]
        else:
            own = []
        return own + list(self.head.parameters())

    def trunk_parameters(self) -> list[nn.Parameter]:
        """parameters() without the head's."""
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def wrap(self, policy: nn.Module, cfg: DistributedConfig) -> None:
        """Under torchrun: the head, and a separate value model, made data parallel as the policy is (an
        adapter critic runs in the policy's model, wrapped by its learner)."""
        if self.kind == "separate":
            self.model = wrap(self.model, cfg)
        elif self.kind == "adapter":
            self.model = policy
        self.head = wrap(self.head, cfg, mixed=False)  # V in float32 (the head reads hidden.float())

    def modules(self) -> list[nn.Module]:
        """The (wrapped) modules that its optimizer trains."""
        return [self.head] if self.shared else [self.model, self.head]

    def container(self) -> nn.Module:
        """One module holding every parameter of the critic's optimizer (for its sharded checkpoint)."""
        return nn.ModuleDict({"head": self.head} if self.shared else {"model": self.model, "head": self.head})

    def train(self, mode: bool = True) -> None:
        self.head.train(mode)
        if not self.shared:
            self.model.train(mode)

    def values(self, rollout: Rollout, rows: Tensor, layout: str,
               policy_out: TokenLogprobs | None = None) -> Tensor:
        """V (n, C) for `rows` (whole groups). A shared head reads the hidden states of `policy_out` (the
        policy forward that also gave logp); without one, the trunk is run without gradient (head only)."""
        if self.shared and policy_out is not None:
            return self.head(policy_out.hidden)
        adapter = active_adapter(self.model, CRITIC_ADAPTER) if self.kind == "adapter" else nullcontext()
        with torch.no_grad() if self.shared else nullcontext(), adapter:
            hidden = forward_groups(self.model, rollout, rows, layout=layout, with_logp=False,
                                    with_hidden=True).hidden
        return self.head(hidden)

    def save(self, checkpoint: Path) -> None:
        """The Hugging Face layout (see the module docstring); every rank calls it, rank 0 writes."""
        head = export_state(self.head)
        folder = checkpoint if self.shared else checkpoint / CRITIC_ADAPTER
        if self.kind == "separate":  # (an adapter critic's weights were written with the policy's)
            export_pretrained(self.model, folder)
        on_main(lambda: save_file(head, folder / VALUE_HEAD_FILE))

    def load(self, checkpoint: Path) -> None:
        """Resume from a checkpoint written before sharded state: the weights that `save` wrote."""
        folder = checkpoint if self.shared else checkpoint / CRITIC_ADAPTER
        head = unwrap(self.head)
        if self.kind == "adapter":
            unwrap(self.model).load_adapter(str(folder), CRITIC_ADAPTER, is_trainable=True)
        elif not self.shared:
            load_weights(unwrap(self.model), folder)
        head.load_state_dict(load_file(folder / VALUE_HEAD_FILE, device=str(head.linear.weight.device)))


def load_critic(cfg: TrainConfig, policy: nn.Module) -> Critic:
    """The critic that cfg.ppo.critic asks for. A checkpoint with value_head.safetensors restores the head too."""
    spec = cfg.ppo.critic
    device = next(policy.parameters()).device
    if spec.kind == "head":
        return Critic(policy, ValueHead(_hidden_size(policy), device), "head")
    if spec.kind == "adapter":  # a second adapter on the policy's base (peft multi-adapter)
        policy.add_adapter(CRITIC_ADAPTER, peft_lora_config(spec.lora or cfg.model.lora))
        for name, q in policy.named_parameters():
            if f".{CRITIC_ADAPTER}." in name:
                q.requires_grad_(True)
        return Critic(policy, ValueHead(_hidden_size(policy), device), "adapter")
    path = resolve_model_path(spec.name_or_path or cfg.model.name_or_path)
    adapter = Path(path) / "adapter_config.json"
    base = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else path
    model = load_causal_lm(resolve_model_path(base), cfg.model)
    if cfg.model.gradient_checkpointing:
        checkpoint_activations(model)
    lora = spec.lora if spec.lora is not None else cfg.model.lora
    if adapter.is_file():  # a LoRA critic saved by grouprl: its base, with the adapter trainable again
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path, is_trainable=True)
    elif lora.enabled:
        model = add_lora(model, lora)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is not inp.weight:
        out.weight.requires_grad_(False)  # V reads hidden states: an untied LM head gets no gradient (DDP
        # would wait for it), and needs no AdamW state
    head = ValueHead(_hidden_size(model), device)
    saved = Path(path) / VALUE_HEAD_FILE
    if saved.is_file():
        head.load_state_dict(load_file(saved, device=str(device)))
    return Critic(model, head, "separate")
