"""The ``data`` section of a run config: where the corpus is, how it is tokenized and cached."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rampup.configbase import Section


class TokenizerConfig(Section):
    """Which tokenizer turns the corpus into tokens: a saved one, or one trained on the corpus."""

    path: str | None = None
    """A Hugging Face tokenizer.json to load; unset trains a byte-level BPE on the corpus."""

    vocab_size: int = Field(default=4096, ge=257)
    """Vocabulary size of the trained tokenizer (256 byte tokens + the end-of-text token at least).
    Ignored when `path` is set; a tiny corpus may yield fewer merges than asked for."""


class DataConfig(Section):
    """The training corpus and how it is prepared (tokenized once, cached on disk)."""

    source: str = "stdlib"
    """The corpus: `stdlib` (this Python's standard library, an embedded default), or a path to
    a file or folder of text files (.txt, .md, .py, ...), .jsonl files or .parquet files."""

    text_field: str = "text"
    """The JSONL field or Parquet column that holds each document's text."""

    cache_dir: str = ".rampup_cache"
    """Where prepared data (tokenizer, token shards, document index) is written and reused."""

    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """The tokenizer to load or train."""

    val_fraction: float = 0.02
    """Fraction of documents held out for validation, chosen by a hash of each document's text."""

    max_files: int | None = Field(default=None, ge=1)
    """Use only the first N files of the source (sorted by path); unset uses all of them."""

    shard_tokens: int = Field(default=50_000_000, ge=1)
    """Tokens per shard file (a document never spans two shards)."""

    sampler: Literal["staged", "fixed"] = "staged"
    """How batches are cut: `staged` (one token stream cut at whatever seq_len the schedule asks
    for) or `fixed` (the classic fixed-length baseline: shuffled windows of one seq_len)."""

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction_in_range(cls, v: float) -> float:
        if not 0.0 < v < 0.5:
            raise ValueError(f"data.val_fraction must be between 0 and 0.5 (exclusive), got {v}")
        return v
