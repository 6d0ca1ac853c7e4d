"""The reference decoder language model: a Llama-style transformer in one readable file.

Pre-norm RMSNorm -> grouped-query attention with RoPE -> RMSNorm -> SwiGLU, numerically the same as
Hugging Face's ``LlamaForCausalLM`` (tests/unit/models/test_model.py checks parity); it knows nothing of
training. For progressive training: the RoPE cache is non-persistent state that ``DecoderLM.set_rope``
recomputes when a stage changes it, and ``positions`` / ``attn_mask`` / ``segments`` (rampup.data.packing)
restart positions and mask attention per packed document. See docs/architecture.md.

Try it on a CPU in a second:

    python -c "import torch; from rampup.models import ModelConfig, DecoderLM; \
m = DecoderLM(ModelConfig(dim=64, n_layers=2)); print(m(torch.randint(0, 4096, (2, 16))).shape)"
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import PrivateAttr, ValidationInfo, field_validator, model_validator

from rampup.configbase import Section, choice
from rampup.errors import ConfigError
from rampup.models.attention import Pattern, banded_attention, masked_pattern_attention
from rampup.models.docmask import (
    DocumentSpans,
    document_mask,
    document_spans,
    per_document_attention,
)

HF_FAMILIES = ("llama", "qwen2", "mistral", "gpt_neox", "gpt2")
"""Hugging Face model types that model.source: hf accepts (rampup.models.hf)."""

if TYPE_CHECKING:
    # A type checker cannot read a call as a type: to it each choice is the Literal that choice() builds.
    SourceChoice = Literal["reference", "hf"]
    WeightsDtypeChoice = Literal["float32", "bfloat16"]
else:
    SourceChoice = choice("reference", "hf")
    WeightsDtypeChoice = choice("float32", "bfloat16")


class ModelConfig(Section):
    """The model: rampup's reference decoder LM (its shape below) or a Hugging Face causal LM."""

    source: SourceChoice = "reference"
    """reference: rampup's DecoderLM, shaped by the fields below; hf: a Hugging Face causal LM
    (Llama, Qwen2, Mistral, GPT-NeoX, GPT-2) from model.path or model.hf_config."""
    path: str | None = None
    """source hf: a local model folder (config.json and safetensors weights), for continued pre-training."""
    hf_config: dict[str, Any] | None = None
    """source hf: an inline transformers config with its model_type, for a freshly initialised model."""
    weights_dtype: WeightsDtypeChoice = "float32"
    """source hf: the dtype the weights train in. float32 (the default) keeps fp32 master weights
    whatever the folder stores (bf16 weights are upcast); bfloat16 trains them as they are, at half the
    memory and with bf16 optimizer state."""
    vocab_size: int = 4096
    """Number of token ids; must match the tokenizer."""
    dim: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Number of query heads; dim must be divisible by it."""
    n_kv_heads: int | None = None
    """Number of key/value heads (None = n_heads); fewer gives grouped-query attention."""
    ffn_hidden: int | None = None
    """Hidden width of the SwiGLU MLP (None = 8/3 * dim rounded up to multiple_of)."""
    multiple_of: int = 64
    """The default ffn_hidden is rounded up to a multiple of this."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts; size of the RoPE cache. source hf: the folder's
    max_position_embeddings unless set; a stage whose rope (pi, ntk, yarn) covers a longer seq_len
    (factor x original) raises it, and setting it allows any rope method beyond the folder's limit."""
    rope_base: float = 10000.0
    """RoPE base (theta); larger means slower-rotating, longer-range frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    _native_positions: int | None = PrivateAttr(default=None)

    @field_validator(
        "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "multiple_of", "max_seq_len"
    )
    @classmethod
    def _positive(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"model.{info.field_name} must be a positive integer, got {v}")
        return v

    @field_validator("norm_eps", "init_std")
    @classmethod
    def _positive_float(cls, v: float, info: ValidationInfo) -> float:
        if not v > 0:
            raise ValueError(f"model.{info.field_name} must be > 0, got {v}")
        return v

    @field_validator("rope_base")
    @classmethod
    def _rope_base(cls, v: float) -> float:
        if not v > 1:
            raise ValueError(f"model.rope_base must be > 1 (typically 10000), got {v}")
        return v

    @model_validator(mode="after")
    def _hf(self) -> ModelConfig:
        if self.source == "reference":
            if self.weights_dtype != "float32":
                raise ValueError(
                    "model.weights_dtype is for model.source: hf; the reference model keeps fp32 "
                    "weights (train.precision sets the compute dtype)"
                )
            if self.path is not None or self.hf_config is not None:
                raise ValueError(
                    "model.path and model.hf_config are for model.source: hf; set source: hf or remove them"
                )
            return self
        if (self.path is None) == (self.hf_config is None):
            raise ValueError(
                "model.source hf needs exactly one of model.path (a local model folder) or "
                "model.hf_config (an inline config with model_type)"
            )
        if self.path is not None:
            cfg_file = Path(self.path) / "config.json"
            if not Path(self.path).exists():
                raise ValueError(
                    f"model.path {self.path} does not exist; give a Hugging Face model folder "
                    "(a relative path is read from the config file's folder)"
                )
            if not cfg_file.is_file():
                raise ValueError(f"model.path {self.path} has no config.json; give a Hugging Face model folder")
            d = json.loads(cfg_file.read_text())
        else:
            d = self.hf_config
        if d.get("model_type") not in HF_FAMILIES:
            raise ValueError(
                f"model type {d.get('model_type')!r} is not supported; use one of {', '.join(HF_FAMILIES)}"
            )
        # the Hugging Face config is the truth for what rampup checks against (tokenizer, positions)
        self.__dict__["vocab_size"] = int(d.get("vocab_size") or self.vocab_size)
        native = int(d.get("max_position_embeddings") or d.get("n_positions") or self.max_seq_len)
        self._native_positions = native
        if "max_seq_len" not in self.model_fields_set:
            self.__dict__["max_seq_len"] = native  # raised where a stage's rope covers a longer seq_len
        elif d.get("model_type") == "gpt2" and self.max_seq_len > native:
            raise ValueError(
                f"model.max_seq_len {self.max_seq_len}: GPT-2 learns one embedding per position "
                f"({native} in this model), so it cannot take longer sequences; lower it to {native}"
            )
        return self

    @property
    def native_positions(self) -> int | None:
        """source hf: the positions the model was built for (its config's max_position_embeddings)."""
        return self._native_positions

    @property
    def extendable(self) -> bool:
        """source hf without model.max_seq_len set: a stage's rope (pi, ntk, yarn) may cover lengths past
        the model's positions (factor x original)."""
        return self.source == "hf" and "max_seq_len" not in self.model_fields_set and self.native_positions is not None

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(
                f"model.dim {self.dim} is not divisible by model.n_heads {self.n_heads}; choose n_heads dividing dim"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head dim model.dim / model.n_heads = {self.head_dim} must be even "
                "for RoPE; change model.dim or model.n_heads"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads {self.n_heads} is not divisible by model.n_kv_heads "
                f"{self.kv_heads}; choose n_kv_heads dividing n_heads"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """n_kv_heads resolved (None means one key/value head per query head)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden(self) -> int:
        """ffn_hidden resolved: SwiGLU's 8/3 * dim keeps the MLP's parameters at 8 * dim^2."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)


def attended_keys(T: int, pattern: Pattern | None = None) -> int:
    """Query-key pairs a causal attention layer scores over T tokens: T(T+1)/2 for full causal
    attention, about T x window for a sliding window (plus the global tokens a query sees outside it)."""
    if T <= 0:
        return 0
    if pattern is None or pattern.window >= T:
        return T * (T + 1) // 2
    w, g = pattern.window, pattern.n_global
    pairs = w * (w + 1) // 2 + (T - w) * w  # min(i + 1, w) summed over queries i
    if g:  # query i also sees globals j < g with j <= i - w: min(g, i - w + 1) of them when positive
        n = T - w  # queries i = w .. T-1 contribute min(g, i - w + 1)
        full = max(0, n - g)
        pairs += g * (g + 1) // 2 + full * g if n >= g else n * (n + 1) // 2
    return pairs


def flops_per_token(
    cfg: ModelConfig,
    seq_len: int,
    *,
    patterns: list[Pattern | None] | None = None,
    doc_lengths: list[list[int]] | None = None,
) -> float:
    """Training FLOPs per token (forward + backward) as the kernels compute them: ``6 N + 12 d K / T``.

    N counts the parameters that take part in matmuls (every Linear weight in the blocks plus the
    output head; embedding lookups and norms are free), 6N being PaLM's forward + backward count.
    K is the number of query-key pairs each layer scores in a sequence of T = ``seq_len`` tokens
    (QK^T and AV are 4 d FLOPs per pair forward, 12 d forward + backward): T(T+1)/2 for causal
    attention (the half square causal kernels compute), about T x window for a window ``patterns``
    entry (per layer, None = causal), and the sum over documents for document masking
    (``doc_lengths``: per row, the lengths of its documents). PaLM's ``12 L d T`` counts the full
    square; for causal attention that overstates the attention term about two-fold.
    """
    d, kv = cfg.dim, cfg.kv_heads * cfg.head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * cfg.hidden  # q, k+v, o, w1+w3+w2
    n = cfg.n_layers * per_layer + d * cfg.vocab_size
    if seq_len <= 0:
        return 6.0 * n
    patterns = patterns if patterns is not None else [None] * cfg.n_layers
    rows = doc_lengths if doc_lengths is not None else [[seq_len]]
    tokens = sum(sum(r) for r in rows)
    pairs = sum(attended_keys(L, p) for p in patterns for r in rows for L in r)  # over layers and documents
    return 6.0 * n + 12.0 * d * pairs / tokens


# ----------------------------------------------------------------------------- rotary positions


def rope_inv_freq(head_dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Unscaled RoPE frequencies base^(-2i/head_dim), i < head_dim/2, in fp32."""
    i = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
    return 1.0 / base ** (i / head_dim)


def precompute_rope(
    head_dim: int,
    max_seq_len: int,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    *,
    inv_freq: torch.Tensor | None = None,
    attention_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables, each (max_seq_len, head_dim), in Hugging Face's rotate-half layout.

    Frequency i drives dims i and i + head_dim/2 (hence the duplicated halves). ``attention_scale``
    multiplies both tables, so q.k scales by its square: YaRN's mscale, as Hugging Face applies it.
    """
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, base, device)
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos() * attention_scale, emb.sin() * attention_scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by cos/sin broadcastable to it, e.g. (T, hd) or (B, 1, T, hd)."""
    # cast the fp32 tables down (as HF does) so bf16 activations stay bf16 under autocast
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- the blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | DocumentSpans | None = None,
        pattern: Pattern | None = None,
        cap_rope: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); cos/sin broadcastable to (B, 1, T, hd), already gathered at the positions.

        ``pattern`` (a sliding window, with or without global tokens) restricts attention further:
        alone it runs the block-banded kernel (memory T * window); with a mask the two are combined.
        ``cap_rope`` = (cos, sin) at position ``window`` and at position 0, for a pattern whose
        global tokens are seen at a capped distance (LM-Infinite): q rotated at ``window``, the
        global keys at 0, so their relative distance is ``window`` whatever their true one.

        ``mask`` is the complete bool mask (True = may attend), causality included; None means
        plain causal attention, which lets SDPA pick its fastest kernel; DocumentSpans means
        causal attention within each packed document, one SDPA call per document.
        """
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        q_cap = k_cap = None
        if cap_rope is not None and pattern is not None and pattern.capped and pattern.n_global:
            cos_w, sin_w, cos_0, sin_0 = cap_rope
            q_cap, k_cap = apply_rope(q, cos_w, sin_w), apply_rope(k[:, :, : pattern.n_global], cos_0, sin_0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa shares each kv head among n_heads/n_kv consecutive query heads, the same
        # grouping as repeat_interleave, without materialising the repeated k and v
        gqa = self.n_kv != self.n_heads
        if pattern is not None and mask is None:
            y = banded_attention(q, k, v, pattern, q_cap, k_cap)  # (B, H, T, hd)
        elif pattern is not None:
            if not isinstance(mask, torch.Tensor):  # forward_hidden gives a window pattern a dense mask instead
                raise ValueError("a window pattern combines with a dense attention mask, not with DocumentSpans")
            y = masked_pattern_attention(q, k, v, mask, pattern, q_cap, k_cap)
        elif isinstance(mask, DocumentSpans):
            y = per_document_attention(q, k, v, mask, enable_gqa=gqa)  # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
            )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor, hidden: int | None = None) -> torch.Tensor:
        """``hidden``: sub-network training (rampup.knobs.subnets) runs only the first this-many units (None: all);
        an argument, not module state, so that a recomputation in backward runs the same units."""
        k = hidden
        if k is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return F.linear(
            F.silu(F.linear(x, self.w1.weight[:k])) * F.linear(x, self.w3.weight[:k]), self.w2.weight[:, :k]
        )


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | DocumentSpans | None = None,
        pattern: Pattern | None = None,
        cap_rope: tuple[torch.Tensor, ...] | None = None,
        mlp_hidden: int | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, pattern, cap_rope)
        return x + self.mlp(self.mlp_norm(x), mlp_hidden)


# ----------------------------------------------------------------------------- the model


class DecoderLM(nn.Module):
    # buffers (register_buffer), declared for the type checker
    inv_freq: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # the RoPE tables are derived state: kept out of state_dict so checkpoints hold only
        # parameters, and rebuilt by set_rope (the curriculum re-applies it on resume)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_base)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.rope_base: float = cfg.rope_base
        self.max_seq_len: int = cfg.max_seq_len
        self.attention_scale: float = 1.0
        self.set_rope(cfg.rope_base)
        self.attn_patterns: list[Pattern | None] = [None] * cfg.n_layers  # full causal everywhere
        self.active_depth: int | None = None
        """Sub-network training (rampup.knobs.subnets): only the lowest this-many blocks run (None: all)."""
        self.active_hidden: int | None = None
        """Sub-network training: each block's MLP runs its first this-many hidden units (None: all),
        passed to the blocks as an argument (a checkpointed block recomputes what it ran)."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        # GPT-2: each block adds two projections to the residual stream; shrinking them keeps the
        # stream's variance independent of depth at initialisation
        for layer in self.layers:
            if not isinstance(layer, Block):
                raise TypeError(f"reset_parameters: {type(layer).__name__} in model.layers is not a Block")
            for w in (layer.attn.o_proj.weight, layer.mlp.w2.weight):
                nn.init.normal_(w, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))

    @torch.no_grad()
    def set_rope(
        self,
        base: float | None = None,
        *,
        inv_freq: torch.Tensor | None = None,
        max_seq_len: int | None = None,
        attention_scale: float = 1.0,
    ) -> None:
        """Recompute the RoPE tables in place, on the model's device; nothing else changes.

        Give ``base`` for plain RoPE, or ``inv_freq`` (head_dim/2,) for frequencies a context
        extension method has already scaled; with neither the current frequencies are kept.
        ``rope_base`` stays the base the frequencies came from; ``inv_freq`` is what is used.
        """
        if base is not None and inv_freq is not None:
            raise ConfigError("set_rope takes either base or inv_freq, not both")
        half = self.cfg.head_dim // 2
        if inv_freq is not None and tuple(inv_freq.shape) != (half,):
            raise ConfigError(f"inv_freq must have shape ({half},) = (head_dim/2,), got {tuple(inv_freq.shape)}")
        if base is not None and not base > 1:
            raise ConfigError(f"rope base must be > 1, got {base}")
        if max_seq_len is not None and max_seq_len <= 0:
            raise ConfigError(f"max_seq_len must be positive, got {max_seq_len}")
        device = self.inv_freq.device
        if base is not None:
            self.rope_base = float(base)
            inv_freq = rope_inv_freq(self.cfg.head_dim, base, device)
        elif inv_freq is None:
            inv_freq = self.inv_freq.float()
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32).clone()
        self.max_seq_len = max_seq_len or self.max_seq_len
        self.attention_scale = float(attention_scale)
        self.rope_cos, self.rope_sin = precompute_rope(
            self.cfg.head_dim,
            self.max_seq_len,
            device=device,
            inv_freq=self.inv_freq,
            attention_scale=self.attention_scale,
        )

    def forward_hidden(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        spans: DocumentSpans | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim) for token ids idx (B, T).

        positions: (B, T) long RoPE positions (default 0..T-1), e.g. restarting at each packed
        document. attn_mask: bool, broadcastable to (B, 1, T, T), True = may attend; it is combined
        with the causal mask, so it only ever removes keys. segments: (B, T) long document ids,
        non-decreasing along each row (rampup.data.packing.segment_ids); each token attends only
        to the earlier tokens of its own document, the same as attn_mask=document_mask(segments)
        but computed per document (reading the boundaries syncs with the device once per call).
        spans: the same documents as a precomputed DocumentSpans (the engine builds it on the host
        from the CPU batch, so the forward pass never syncs).
        """
        B, T = idx.shape
        if T > self.max_seq_len:
            raise ConfigError(
                f"sequence length {T} exceeds model.max_seq_len {self.max_seq_len}; "
                "raise model.max_seq_len or shorten the stage's seq_len"
            )
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd), broadcasts over (B, H)
        else:
            cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, T, hd)
            sin = self.rope_sin[positions].unsqueeze(1)
        mask = self._mask(idx, attn_mask, segments, spans)
        x = self.tok_emb(idx)  # (B, T, C)
        depth = self.active_depth or len(self.layers)  # a sub-network runs the lowest blocks only
        for layer, pattern in zip(self.layers[:depth], self.attn_patterns[:depth], strict=True):
            cap = None
            if pattern is not None and pattern.capped and T > pattern.window:  # some globals lie outside windows
                cap = (self.rope_cos[pattern.window], self.rope_sin[pattern.window], self.rope_cos[0], self.rope_sin[0])
            x = layer(x, cos, sin, mask, pattern, cap, self.active_hidden)
        return self.norm(x)

    def _mask(
        self,
        idx: torch.Tensor,
        attn_mask: torch.Tensor | None,
        segments: torch.Tensor | None,
        spans: DocumentSpans | None,
    ) -> torch.Tensor | DocumentSpans | None:
        """The one mask forward_hidden's attention takes: per-document spans where no window pattern needs a
        dense mask, else a bool (B or 1, 1, T, T) mask combined with the causal one; None for plain causal."""
        B, T = idx.shape
        mask: torch.Tensor | DocumentSpans | None = None
        if spans is not None:
            if segments is not None or attn_mask is not None:
                raise ValueError("give one of attn_mask, segments or spans")
            if (spans.batch_size, spans.seq_len) != (B, T):
                raise ValueError(f"spans are for {(spans.batch_size, spans.seq_len)}, idx is {(B, T)}")
            if any(self.attn_patterns):  # a window pattern combines with a dense document mask
                attn_mask = document_mask(spans.segment_ids(idx.device))
            else:
                mask = spans
        if segments is not None:
            if attn_mask is not None:
                raise ValueError("give attn_mask or segments, not both")
            if tuple(segments.shape) != (B, T):
                raise ValueError(f"segments must have the shape of idx {(B, T)}, got {tuple(segments.shape)}")
            if any(self.attn_patterns):  # a window pattern combines with a dense document mask
                attn_mask = document_mask(segments)
            else:
                mask = document_spans(segments)
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise TypeError(f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}")
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = attn_mask & causal  # (B or 1, 1, T, T)
        return mask

    def set_attention(self, patterns: list[Pattern | None]) -> None:
        """Per layer: None for full causal attention, or a window Pattern (rampup.models.attention)."""
        if len(patterns) != len(self.layers):
            raise ConfigError(f"set_attention got {len(patterns)} patterns for {len(self.layers)} layers")
        self.attn_patterns = list(patterns)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) hidden states -> (B, T, vocab) logits."""
        return self.lm_head(h)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        spans: DocumentSpans | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab); keywords as in ``forward_hidden``."""
        return self.logits(
            self.forward_hidden(idx, positions=positions, attn_mask=attn_mask, segments=segments, spans=spans)
        )

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; shared (tied) tensors count once. non_embedding drops the token
        embedding, and with it a tied head, as nanoGPT does."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already de-duplicates
        return n - self.tok_emb.weight.numel() if non_embedding else n
