"""The model seam: what the engine may ask of a model, and rampup's own DecoderLM behind it.

The engine, the knobs and the tasks talk only to a :class:`ModelAdapter` (torchtitan's ``ModelSpec``
idea: the model knows nothing of training), so a new model plugs in by writing one adapter
(tests/unit/engine/test_seams.py trains a classifier through it). An adapter holds ``module`` (what the
optimizer, checkpointer and compile see) and answers ``forward(batch)`` (hidden states plus the head, so a
loss can run the head itself, tiled), ``hidden_states``, ``blocks`` / ``wrap_block`` (freezing,
checkpointing, tiled MLPs, FSDP), ``flops_per_item`` (what the kernels compute), ``supports(knob)``
(other knobs are refused at plan time) and ``to_hf_state_dict`` / ``from_hf_state_dict``.
See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model

from rampup.errors import ConfigError
from rampup.models.attention import AttentionSpec, layer_patterns
from rampup.models.llm import DecoderLM, ModelConfig, flops_per_token
from rampup.models.rope import RopeSpec, apply_rope_spec
from rampup.protocols import Batch, ModelOutput
from rampup.protocols import (
    ModelAdapter as ModelAdapter,  # re-exported: its home before rampup.protocols
)


class ModuleAdapter:
    """The smallest adapter: a module whose forward gives the outputs (logits) itself.

    It knows no blocks, layers or FLOPs of the module, so it supports no knob; what needs them (hidden
    states for distillation, block wrapping, a FLOP count, Hugging Face names) is refused with the reason.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self.head: nn.Module = nn.Identity()

    @property
    def module(self) -> nn.Module:
        return self._module

    def forward(self, batch: Batch) -> ModelOutput:
        return ModelOutput(self._module(batch.inputs, **batch.extra), self.head)

    def hidden_states(self, batch: Batch, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        raise ConfigError(_BARE.format(what="hidden states at chosen layers"))

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return []

    def wrap_block(self, index: int, fn: Callable[[nn.Module], nn.Module]) -> None:
        raise ConfigError(_BARE.format(what=f"block {index}"))

    def flops_per_item(self, shape: tuple[int, ...], **how: Any) -> float:
        raise ConfigError(_BARE.format(what="a FLOP count"))

    def supports(self, knob: str) -> bool:
        return False

    def compile(self, **kwargs: Any) -> None:
        self._module = torch.compile(self._module, **kwargs)  # type: ignore[assignment]  # returns a callable Module

    def num_params(self) -> int:
        return sum(p.numel() for p in self._module.parameters())

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        raise ConfigError(_BARE.format(what="Hugging Face parameter names"))

    def from_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise ConfigError(_BARE.format(what="Hugging Face parameter names"))


_BARE = (
    "a bare module (ModuleAdapter) has no {what}; wrap the model in an adapter that knows its structure "
    "(rampup.models.adapter.DecoderLMAdapter, rampup.models.hf.HFCausalLMAdapter, or your own ModelAdapter)"
)


class DecoderLMAdapter:
    """rampup's reference :class:`~rampup.models.llm.DecoderLM` behind the seam."""

    KNOBS = frozenset(
        {
            "seq_len",
            "batch_tokens",
            "lr_mult",
            "passkey_fraction",
            "mix",
            "bucket_odds",
            "rope",
            "attention",
            "window",
            "loss_shards",
            "mlp_shards",
            "activation_checkpoint",
            "activation_offload",
            "freeze",
            "lr_groups",
            "lr_layer_decay",
            "optimizer_state",
            "teacher",
            "distill_weight",
            "label_weight",
            "distill_temperature",
            "distill_hidden",
            "distill_hidden_weight",
            "depth",
            "growth",
            "subnet",
            "mlp_width",
            "width",
            "growth_noise",
        }
    )
    """Every knob rampup ships acts on the reference model."""

    def __init__(self, module: DecoderLM) -> None:
        self.module = module
        self.head: nn.Module = module.lm_head
        self.loss_shards = 1  # the loss_shards knob (rampup.knobs.memory)
        self._hidden: Callable[..., torch.Tensor] = module.forward_hidden  # replaced by a compiled version by compile()

    @classmethod
    def build(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> DecoderLMAdapter:
        """A fresh model from a ModelConfig, initialised from torch's current RNG."""

        if torch.device(device).type == "meta":  # built in place: .to("meta") would untie a tied head
            with torch.device("meta"):
                return cls(DecoderLM(cfg))
        return cls(DecoderLM(cfg).to(device))

    @classmethod
    def load(cls, cfg: ModelConfig, weights: str, device: torch.device | str = "cpu") -> DecoderLMAdapter:
        """A model with the weights of a safetensors file (a checkpoint's model.safetensors)."""

        adapter = cls.build(cfg, device)
        missing, unexpected = load_model(adapter.module, weights, strict=False, device=str(device))
        if missing or unexpected:
            raise ConfigError(
                f"{weights} does not fit this model config (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); use the config it was trained with"
            )
        return adapter

    @property
    def cfg(self) -> ModelConfig:
        return self.module.cfg

    def forward(self, batch: Batch) -> ModelOutput:
        # the compiled graphs are for training shapes only; evaluation runs eagerly
        hidden = self._hidden if self.module.training else self.module.forward_hidden
        return ModelOutput(hidden(batch.inputs, **batch.extra), self.head, self.loss_shards)

    def hidden_states(self, batch: Batch, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Residual stream after each block in ``layers`` (block i's output), plus the final-normed
        hidden states under key ``len(blocks)``."""
        wanted = sorted(set(layers))
        n = len(self.module.layers)
        bad = [i for i in wanted if not 0 <= i <= n]
        if bad:
            raise ConfigError(
                f"hidden_states: layers {bad} do not exist; the model has blocks 0..{n - 1} "
                f"(and {n} for the final norm)"
            )
        out: dict[int, torch.Tensor] = {}
        hooks = [
            self.module.layers[i].register_forward_hook(lambda m, a, y, i=i: out.__setitem__(i, y))
            for i in wanted
            if i < n
        ]
        try:
            h = self.module.forward_hidden(batch.inputs, **batch.extra)
        finally:
            for hk in hooks:
                hk.remove()
        if n in wanted:
            out[n] = h
        return out

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"layers.{i}", b) for i, b in enumerate(self.module.layers)]

    def wrap_block(self, index: int, fn: Callable[[nn.Module], nn.Module]) -> None:
        self.module.layers[index] = fn(self.module.layers[index])

    def set_rope(self, spec: RopeSpec, seq_len: int | None = None) -> None:

        apply_rope_spec(self.module, spec, seq_len)

    def set_attention(self, spec: AttentionSpec, window: int) -> None:

        self.module.set_attention(layer_patterns(spec, window, len(self.module.layers)))

    def flops_per_item(self, shape: tuple[int, ...], *, doc_lengths: list[list[int]] | None = None, **_: Any) -> float:
        """Training FLOPs per token of a (B, T) batch at the live attention patterns."""

        return flops_per_token(self.cfg, shape[-1], patterns=self.module.attn_patterns, doc_lengths=doc_lengths)

    def supports(self, knob: str) -> bool:
        return knob in self.KNOBS

    def compile(self, **kwargs: Any) -> None:
        """torch.compile the hidden-state forward (the head stays eager, so a loss may tile it)."""
        self._hidden = torch.compile(self.module.forward_hidden, **kwargs)

    def num_params(self) -> int:
        return self.module.num_params()

    # ------------------------------------------------------------------ Hugging Face names
    _HF_LAYER = {
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "attn.q_proj.weight": "self_attn.q_proj.weight",
        "attn.k_proj.weight": "self_attn.k_proj.weight",
        "attn.v_proj.weight": "self_attn.v_proj.weight",
        "attn.o_proj.weight": "self_attn.o_proj.weight",
        "mlp.w1.weight": "mlp.gate_proj.weight",
        "mlp.w3.weight": "mlp.up_proj.weight",
        "mlp.w2.weight": "mlp.down_proj.weight",
    }
    _HF_TOP = {
        "tok_emb.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }

    def _to_hf_key(self, key: str) -> str:
        if key in self._HF_TOP:
            return self._HF_TOP[key]
        _, i, rest = key.split(".", 2)  # layers.{i}.{rest}
        return f"model.layers.{i}.{self._HF_LAYER[rest]}"

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under LlamaForCausalLM's names (a tied head appears under both names, as in HF)."""
        return {self._to_hf_key(k): v for k, v in self.module.state_dict().items()}

    def from_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ours = {self._to_hf_key(k): k for k in self.module.state_dict()}
        missing = sorted(set(ours) - set(state))
        if self.cfg.tie_embeddings:
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing:
            raise ConfigError(
                f"the Hugging Face state dict lacks {missing[:3]}; is it a Llama-family model with this config's shape?"
            )
        self.module.load_state_dict({ours[k]: v for k, v in state.items() if k in ours}, strict=False)
