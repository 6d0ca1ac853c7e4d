"""Which adapter a ModelConfig asks for (kept apart from both adapters, which must not import each other)."""

from __future__ import annotations

import torch

from rampup.errors import ConfigError
from rampup.models.adapter import DecoderLMAdapter
from rampup.models.hf import HFCausalLMAdapter
from rampup.models.llm import ModelConfig


def build_adapter(cfg: ModelConfig, device: torch.device | str = "cpu") -> DecoderLMAdapter | HFCausalLMAdapter:
    """The adapter a ModelConfig asks for: the reference DecoderLM, or a Hugging Face causal LM
    (its folder's weights, or fresh from its inline config; on the meta device, weights are not read)."""
    if cfg.source == "reference":
        return DecoderLMAdapter.build(cfg, device)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.weights_dtype]
    if cfg.hf_config is not None:
        adapter = HFCausalLMAdapter.from_config(cfg.hf_config, device, dtype)
    elif cfg.path is None:  # ModelConfig's validation requires one of the two
        raise ConfigError("model.source hf needs model.path (a model folder) or model.hf_config")
    elif str(device) == "meta":
        adapter = HFCausalLMAdapter.from_folder_config(cfg.path, device)
    else:
        adapter = HFCausalLMAdapter.from_pretrained(cfg.path, device, dtype)
    adapter.extend_positions(cfg.max_seq_len)  # past the folder's limit where the run was allowed to go
    return adapter
