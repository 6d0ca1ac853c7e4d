"""Models rampup trains; the reference is a Llama-style decoder language model."""

from rampup.models.llm import DecoderLM, ModelConfig, flops_per_token

__all__ = ["DecoderLM", "ModelConfig", "flops_per_token"]
