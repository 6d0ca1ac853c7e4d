"""``rampup export RUN|CHECKPOINT --format hf OUT_DIR``: a folder Hugging Face ``from_pretrained`` loads.

The reference model exports as ``LlamaForCausalLM`` (or ``MistralForCausalLM`` with a window on every
layer), carrying its last stage's RoPE in the family's own config (``rope_theta``, ``linear``, ``yarn``;
``dynamic`` with its original length as ``max_position_embeddings``). Refused: sinks, and full/window
hybrids (Qwen2 expresses them, but ``AutoTokenizer`` loads every qwen2 folder with Qwen's tokenizer).
Weights are safetensors in the chosen dtype; rampup's tokenizer is written as a fast tokenizer with EOT
as eos, while a Hugging Face run exports its folder's own tokenizer whole. The folder is built beside
OUT_DIR and renamed into place; a non-empty OUT_DIR is refused. See docs/hf.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from rampup.data.mixture import first_folder
from rampup.data.prepare import load_prepared_tokenizer
from rampup.data.tokenizer import EOT, eot_id, same_tokenizer
from rampup.engine.checkpoint.format import load_checkpoint
from rampup.engine.runs import check_new_folder, new_folder, read_run
from rampup.errors import ConfigError
from rampup.knobs.ema import load_ema_weights
from rampup.knobs.growth import fit_to_checkpoint
from rampup.knobs.subnets import extract, parse_export
from rampup.models.adapter import DecoderLMAdapter
from rampup.models.build import build_adapter
from rampup.models.hf import HFCausalLMAdapter
from rampup.schedule.registry import KnobContext, KnobRunner
from rampup.tools.images import export_classifier
from rampup.tools.longeval import open_run

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from rampup.config import RunConfig
    from rampup.models.llm import ModelConfig
    from rampup.models.rope import RopeSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_rope(spec: RopeSpec, model_base: float, d: int) -> tuple[dict[str, Any], int | None]:
    """(rope_parameters, max_position_embeddings override) for a RopeSpec over d rotary dims."""
    base = spec.base or model_base
    if spec.method == "base":
        return {"rope_type": "default", "rope_theta": base}, None
    if spec.method == "ntk":
        return {"rope_type": "default", "rope_theta": base * spec.factor ** (d / (d - 2))}, None
    if spec.method == "pi":
        return {"rope_type": "linear", "rope_theta": base, "factor": spec.factor}, None
    if spec.method == "dynamic_ntk":
        return {"rope_type": "dynamic", "rope_theta": base, "factor": spec.factor}, spec.original_max_len
    return {
        "rope_type": "yarn",
        "rope_theta": base,
        "factor": spec.factor,
        "original_max_position_embeddings": spec.original_max_len,
        "beta_fast": spec.beta_fast,
        "beta_slow": spec.beta_slow,
    }, None


def hf_config(
    model_cfg: ModelConfig, knobs: dict[str, Any], *, eos_token_id: int | None, dtype: str
) -> PretrainedConfig:
    """The transformers config of the reference model with a stage's rope/attention knobs."""
    import transformers

    spec, window = knobs["attention"], knobs["window"]
    rope, max_pos = hf_rope(knobs["rope"], model_cfg.rope_base, model_cfg.head_dim)
    common: dict[str, Any] = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.dim,
        intermediate_size=model_cfg.hidden,
        num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.n_heads,
        num_key_value_heads=model_cfg.kv_heads,
        head_dim=model_cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_pos or model_cfg.max_seq_len,
        rms_norm_eps=model_cfg.norm_eps,
        tie_word_embeddings=model_cfg.tie_embeddings,
        rope_parameters=rope,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        dtype=dtype,
    )
    if spec.kind == "sinks":
        raise ConfigError(
            f"the run's last stage uses attention '{spec}' (global tokens plus a window), which no "
            "Hugging Face model family expresses; export a run whose last stage is causal or window"
        )
    if spec.kind == "causal":
        return transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    if spec.full(model_cfg.n_layers):
        # Qwen2 expresses per-layer windows (layer_types), but AutoTokenizer gives every qwen2 folder
        # Qwen's own tokenizer class, which re-splits text with Qwen's pattern: the export would load
        # and tokenize differently from the run. Refused until there is a family that keeps our tokenizer.
        raise ConfigError(
            f"the run's last stage mixes full and windowed layers ('{spec}'); the Hugging Face "
            "family for that (Qwen2) would load a different tokenizer, so it is not exported; "
            "export a run whose last stage is causal or windowed on every layer"
        )
    return transformers.MistralConfig(sliding_window=window, **common)


def hf_model_with_knobs(adapter: HFCausalLMAdapter, knobs: dict[str, Any], dtype: str) -> PreTrainedModel:
    """A Hugging Face model trained by rampup, its config carrying the last stage's RoPE and window."""

    import transformers

    model = adapter.module
    assert isinstance(model, transformers.PreTrainedModel)  # what an HF adapter wraps
    KnobRunner(KnobContext(adapter)).apply(knobs, model.config.max_position_embeddings)  # sets sliding_window
    if adapter.supports("rope"):
        base, d = adapter.rope_base, adapter.rotary_dim  # d is set: supports("rope") means rotary embeddings
        if base is None or d is None:
            raise ConfigError(
                f"{type(model).__name__}'s config names no rope_theta, so the RoPE of the run's last stage "
                "cannot be written into the export"
            )
        rope, max_pos = hf_rope(knobs["rope"], base, d)
        partial = (model.config.rope_parameters or {}).get("partial_rotary_factor")
        model.config.rope_parameters = rope | ({"partial_rotary_factor": partial} if partial else {})
        if max_pos:
            model.config.max_position_embeddings = max_pos
    model.config.dtype = dtype
    return model


def _source_tokenizer(cfg: RunConfig, tok: Tokenizer) -> PreTrainedTokenizerBase | None:
    """The Hugging Face folder's own tokenizer, whole (bos/unk/pad tokens, chat template, its class), when
    the run trained an HF folder with it; None otherwise (rampup's tokenizer is written instead)."""
    import transformers

    folder = Path(cfg.model.path) if cfg.model.source == "hf" and cfg.model.path else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    if not same_tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), tok):
        return None  # the run tokenized with another tokenizer (data.tokenizer.path): that one is exported
    return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def export_hf(
    path: str | Path, out_dir: str | Path, *, dtype: str = "float32", ema: bool = False, subnet: str | None = None
) -> Path:
    """Write the checkpoint at ``path`` (a run folder: its latest) as a Hugging Face model folder."""
    import transformers

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    check_new_folder(out)
    if read_run(path, "rampup export").config.get("images"):  # an image classifier: its own folder format
        return export_classifier(path, out, dtype=dtype, ema=ema, subnet=subnet)
    ckpt, cfg, schedule = open_run(path, "rampup export")
    adapter = build_adapter(cfg.model)

    fit_to_checkpoint(adapter, ckpt)  # a run that grew: the model at the checkpoint's depth
    ck = load_checkpoint(ckpt, adapter.module, None)  # verifies the manifest: a damaged one is refused
    state = ck.state
    if ema:  # the averaged weights instead of the raw ones (train.ema)
        load_ema_weights(adapter.module, ck.part_tensors, str(ckpt))
    if subnet is not None:  # a sub-network of the model (rampup.knobs.subnets), as a standalone model
        if not isinstance(adapter, DecoderLMAdapter):  # model.source: hf
            raise ConfigError("--subnet extracts sub-networks of the reference model only")
        depth, frac = parse_export(subnet)
        adapter = extract(adapter, depth, max(1, int(round(frac * adapter.cfg.hidden))))
    knobs = schedule.at(min(int(state["progress"]["tokens"]), schedule.total_tokens - 1))
    tok = load_prepared_tokenizer(first_folder(cfg.data, prepare=True))
    if isinstance(adapter, HFCausalLMAdapter):  # model.source: hf
        model = hf_model_with_knobs(adapter, knobs, dtype)
        hf_cfg = model.config
    else:
        hf_cfg = hf_config(adapter.cfg, knobs, eos_token_id=eot_id(tok, cfg.data.tokenizer.eot or EOT), dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(adapter.to_hf_state_dict(), strict=False)
        missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")]  # tied: one tensor
        if missing or unexpected:
            raise ConfigError(
                f"export to {type(model).__name__} does not match the weights (missing {missing[:3]}, "
                f"unexpected {list(unexpected)[:3]})"
            )
    model.to(DTYPES[dtype])  # type: ignore[arg-type]  # transformers wraps .to in functools.wraps: self typed as arg 1
    fast = _source_tokenizer(cfg, tok)
    if fast is None:
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=cfg.data.tokenizer.eot or EOT)
    fast.model_max_length = hf_cfg.max_position_embeddings
    with new_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
    return out
