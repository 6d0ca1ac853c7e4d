"""Hugging Face causal LMs behind rampup's model seam: Llama, Qwen2, Mistral, GPT-NeoX and GPT-2.

:class:`HFCausalLMAdapter` wraps a ``transformers`` ``*ForCausalLM`` so that the engine trains it like the
reference model. Knobs act through the model's own machinery: ``rope`` sets its rotary embedding (the
formulas of rampup.models.rope, over the rotary dims it really uses; GPT-2 refuses it); ``attention`` /
``window`` use its own sliding-window support (sinks, and families without one, are refused); ``seq_len``
past ``max_position_embeddings`` needs model.max_seq_len or a stage rope that covers it
(:meth:`extend_positions`). Loading runs no code: safetensors only (pickled ``.bin`` refused), never
``trust_remote_code``. Document masks go in as a dense 4-d bool mask. See docs/hf.md.

    from rampup.models.hf import HFCausalLMAdapter
    adapter = HFCausalLMAdapter.from_config({"model_type": "llama", "hidden_size": 64, ...})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rampup.errors import ConfigError
from rampup.models.adapter import Batch, ModelOutput
from rampup.models.attention import AttentionSpec, Pattern
from rampup.models.docmask import document_mask
from rampup.models.llm import HF_FAMILIES as FAMILIES  # noqa: E402
from rampup.models.llm import attended_keys
from rampup.models.rope import RopeSpec, rope_frequencies

_WINDOWED = ("mistral", "qwen2")


class HFCausalLMAdapter:
    def __init__(self, module: nn.Module) -> None:
        hf: Any = module  # a transformers *ForCausalLM: its config's fields and its submodules differ by family
        family = hf.config.model_type
        if family not in FAMILIES:
            raise ConfigError(
                f"Hugging Face model type '{family}' is not supported; rampup supports {', '.join(FAMILIES)}"
            )
        self.module, self.family = module, family
        head = hf.get_output_embeddings()
        self.head: nn.Module = head
        self.base: Any = hf.base_model  # the transformers base model (its attributes differ by family)
        self.loss_shards = 1  # the loss_shards knob (rampup.knobs.memory)
        # the model's rotary embedding (None: learned positions), whose buffers and fields differ by family
        self._rotary: Any | None = next((m for m in module.modules() if hasattr(m, "inv_freq")), None)
        self._base_theta: float | None = (hf.config.rope_parameters or {}).get("rope_theta") if self._rotary else None
        self._hidden: Callable[..., Any] = self.base.forward
        # matmul weights (every >= 2-d parameter but the embeddings) plus the head: fixed for the model's life
        embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        self._matmul_params = sum(p.numel() for p in module.parameters() if p.dim() >= 2 and id(p) not in embeddings)
        self._matmul_params += head.weight.numel()
        self._non_embedding = sum(p.numel() for p in module.parameters() if id(p) not in embeddings)

    @property
    def rotary_dim(self) -> int | None:
        """How many dimensions of each head RoPE rotates (None: learned positions, e.g. GPT-2)."""
        return 2 * self._rotary.inv_freq.numel() if self._rotary is not None else None

    @property
    def rope_base(self) -> float | None:
        return self._base_theta

    @property
    def _config(self) -> Any:
        """The model's transformers config (its fields differ by family)."""
        return self.module.config

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(
        cls, config: dict[str, Any], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> HFCausalLMAdapter:
        """A freshly initialised model from an inline config (``model_type`` plus its fields)."""
        import transformers

        config = dict(config)
        family = config.pop("model_type", None)
        if family not in FAMILIES:
            raise ConfigError(f"model_type {family!r} is not supported; give one of {', '.join(FAMILIES)}")
        try:
            hf_cfg = transformers.AutoConfig.for_model(family, **config)
        except Exception as e:  # transformers validates its config fields strictly (its own error types)
            why = " ".join(str(e).split())
            raise ConfigError(
                f"model.hf_config is not a valid {family} config: {why} (YAML reads a float "
                "written 1e-5 as a string: write 1.0e-5)"
            ) from None
        with torch.device(device):
            module = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
        return cls(module)

    @classmethod
    def from_folder_config(cls, path: str | Path, device: torch.device | str = "meta") -> HFCausalLMAdapter:
        """The architecture of a model folder without its weights (for plans, on the meta device)."""
        import transformers

        hf_cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
        with torch.device(device):
            return cls(transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> HFCausalLMAdapter:
        """A local model folder (config.json + safetensors), its weights in ``dtype`` (default fp32
        master weights, whatever the folder stores)."""
        import transformers

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json; give a Hugging Face model folder (save_pretrained)")
        if not list(path.glob("*.safetensors")):
            hint = (
                (
                    " It holds pickled .bin weights, which rampup never loads (they can run code): convert "
                    "them once with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
                    "safe_serialization=True)"
                )
                if list(path.glob("*.bin"))
                else ""
            )
            raise ConfigError(f"{path} has no safetensors weights.{hint}")
        family = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False).model_type
        if family not in FAMILIES:
            raise ConfigError(f"{path} holds a '{family}' model; rampup supports {', '.join(FAMILIES)}")
        module: nn.Module = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
        return cls(module.to(device))

    # ------------------------------------------------------------------ the seam
    def forward(self, batch: Batch) -> ModelOutput:
        extra = dict(batch.extra)
        kwargs: dict[str, torch.Tensor] = {"position_ids": extra.pop("positions")} if "positions" in extra else {}
        mask = self._document_mask(batch.inputs, extra)
        if mask is not None:
            kwargs["attention_mask"] = mask
        hidden = self._hidden if self.module.training else self.base.forward
        # no KV cache in training: it would hold every layer's keys and values (checkpointing included)
        out = hidden(input_ids=batch.inputs, use_cache=False, **kwargs)
        return ModelOutput(out.last_hidden_state, self.head, self.loss_shards)

    def _document_mask(self, idx: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor | None:
        """Document masking as the 4-d bool mask (B, 1, T, T) every family's attention accepts, the
        model's own sliding window folded in (its mask function is bypassed by a given mask)."""

        spans, seg, mask = extra.pop("spans", None), extra.pop("segments", None), extra.pop("attn_mask", None)
        if spans is not None:
            seg = spans.segment_ids(idx.device)
        if seg is not None:
            mask = document_mask(seg)
        if mask is None:
            return None
        T = idx.shape[1]
        i = torch.arange(T, device=idx.device)
        allowed = i[:, None] >= i[None, :]  # causal, in case the given mask is not
        windows = set(self._layer_windows())
        if len(windows) > 1:
            raise ConfigError(
                f"document masking with a mix of full and windowed layers is not supported for "
                f"{self.family}; use one window for every layer or data.doc_mask: false"
            )
        w = windows.pop()
        if w:
            allowed = allowed & (i[:, None] - i[None, :] < w)
        return mask & allowed

    def _layer_windows(self) -> list[int | None]:
        """Per block, the sliding window its attention uses (None: full causal)."""
        cfg, n = self._config, len(self._block_list()[1])
        if self.family == "qwen2":  # per-layer types; sliding_window alone means nothing there
            return [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types[:n]]
        return [getattr(cfg, "sliding_window", None)] * n

    def hidden_states(self, batch: Batch, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Hidden states after block i (i < n), and the final-normed ones under key n."""
        out = self.base(input_ids=batch.inputs, output_hidden_states=True)
        n = len(self.blocks())
        states = {i: out.hidden_states[i + 1] for i in range(n - 1)} | {n - 1: None, n: out.last_hidden_state}
        got = {i: states[i] for i in layers}
        if any(v is None for v in got.values()):  # HF's last entry is after the final norm
            raise ConfigError(
                f"hidden_states: block {n - 1}'s output before the final norm is not exposed by "
                f"{self.family}; use {n} for the final hidden states"
            )
        return got

    def _block_list(self) -> tuple[str, nn.ModuleList]:
        for name, child in self.base.named_children():
            if isinstance(child, nn.ModuleList):
                return name, child
        raise ConfigError(f"{self.family}: no list of blocks found")

    def blocks(self) -> list[tuple[str, nn.Module]]:
        prefix = self.module.base_model_prefix
        name, blocks = self._block_list()
        return [(f"{prefix}.{name}.{i}", b) for i, b in enumerate(blocks)]

    def wrap_block(self, index: int, fn: Callable[[nn.Module], nn.Module]) -> None:
        _, blocks = self._block_list()
        blocks[index] = fn(blocks[index])

    def supports(self, knob: str) -> bool:
        if knob == "rope":
            return self._rotary is not None
        if knob in ("attention", "window"):
            return self.family in _WINDOWED
        return knob in (
            "seq_len",
            "batch_tokens",
            "lr_mult",
            "passkey_fraction",
            "mix",
            "bucket_odds",
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
        )

    def check_knob(self, knob: str, value: Any) -> None:
        """Values of a supported knob this model still cannot take (raises ConfigError)."""
        hybrid = value is not None and knob == "attention" and value.kind != "causal" and value.full(len(self.blocks()))
        if knob == "attention" and value is not None and (value.kind == "sinks" or (hybrid and self.family != "qwen2")):
            raise ConfigError(
                f"{self.family} has one sliding window for every layer (Qwen2 also takes a mix of "
                f"full and windowed layers); attention '{value}' cannot be expressed"
            )
        if knob == "seq_len" and value is not None:
            top = max(value.start, value.to) if hasattr(value, "start") else value
            cfg = self._config
            limit = cfg.max_position_embeddings if self._rotary is not None else cfg.n_positions
            if top > limit:
                raise ConfigError(
                    f"seq_len {top:g} is beyond this {self.family} model's position limit "
                    f"(max_position_embeddings {limit})"
                )

    def extend_positions(self, n: int) -> None:
        """Declare ``n`` positions (model.max_seq_len past the folder's limit, which a stage's rope covers):
        the config the model is exported with carries it. Learned positions (GPT-2) cannot grow."""
        cfg = self._config
        if self._rotary is None:
            if n > cfg.n_positions:
                raise ConfigError(
                    f"{self.family} learns one embedding per position ({cfg.n_positions}); it cannot take {n}"
                )
            return
        if n > cfg.max_position_embeddings:
            cfg.max_position_embeddings = n
            if hasattr(self._rotary, "max_seq_len_cached"):
                self._rotary.max_seq_len_cached = n

    # knob effects (called by the knobs' apply through ctx.model)
    @torch.no_grad()
    def set_rope(self, spec: RopeSpec, seq_len: int | None = None) -> None:
        rotary, rotary_dim, theta = self._rotary, self.rotary_dim, self._base_theta
        if rotary is None or rotary_dim is None or theta is None:  # supports('rope') is False: refused at plan time
            raise ConfigError(f"{self.family} has no rotary embedding with a rope_theta; the rope knob cannot apply")
        inv_freq, scale = rope_frequencies(spec, rotary_dim, theta, seq_len)
        device = rotary.inv_freq.device
        rotary.inv_freq = inv_freq.to(device)
        if hasattr(rotary, "original_inv_freq"):
            rotary.original_inv_freq = inv_freq.to(device)
        rotary.attention_scaling = scale

    def set_attention(self, spec: AttentionSpec, window: int) -> None:
        cfg = self._config
        if self.family != "qwen2":
            cfg.sliding_window = None if spec.kind == "causal" else int(window)
            return
        # Qwen2 fixes each layer's window when it is built: set the config and every layer alike
        blocks = self._block_list()[1]
        full = set(range(len(blocks))) if spec.kind == "causal" else spec.full(len(blocks))
        cfg.layer_types = ["full_attention" if i in full else "sliding_attention" for i in range(len(blocks))]
        cfg.use_sliding_window = len(full) < len(blocks)
        cfg.sliding_window = int(window) if cfg.use_sliding_window else None
        self.base.has_sliding_layers = cfg.use_sliding_window
        for i, block in enumerate(blocks):
            attn: Any = block.self_attn  # Qwen2's attention module
            attn.layer_type = cfg.layer_types[i]
            attn.sliding_window = cfg.sliding_window if i not in full else None

    def flops_per_item(self, shape: tuple[int, ...], **_: Any) -> float:
        """6N (matmul weights: every >= 2-d parameter but the embeddings, plus the head) + attention pairs."""

        n = self._matmul_params
        T = shape[-1]
        if T <= 0:
            return 6.0 * n
        cfg = self._config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        pairs = sum(attended_keys(T, Pattern(w) if w else None) for w in self._layer_windows())
        return 6.0 * n + 12.0 * heads * head_dim * pairs / T

    def compile(self, **kwargs: Any) -> None:
        self._hidden = torch.compile(self.base.forward, **kwargs)

    def num_params(self) -> int:
        return self._non_embedding

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def from_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=False)
