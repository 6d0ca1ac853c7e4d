"""The ``data`` section of a run config: where the corpus is, how it is tokenized and cached."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rampup.configbase import Section
from rampup.units import Duration, Unit


class TokenizerConfig(Section):
    """Which tokenizer turns the corpus into tokens: a saved one, or one trained on the corpus."""

    path: str | None = None
    """A Hugging Face tokenizer.json to load; unset trains a byte-level BPE on the corpus."""

    eot: str | None = None
    """The token that ends every document: None means rampup's `<|endoftext|>`; for model.source: hf
    with model.path it is the model's own eos token (set from the model folder)."""

    vocab_size: int = Field(default=4096, ge=257)
    """Vocabulary size of the trained tokenizer (256 byte tokens + the end-of-text token at least).
    Ignored when `path` is set; a tiny corpus may yield fewer merges than asked for."""


class BucketsConfig(Section):
    """Dataset decomposition into power-of-two length buckets (Pouransari et al. 2024), for data.sampler: buckets."""

    min_log2: int = 6
    """Shortest bucket is 2^min_log2 tokens; shorter document remainders are dropped."""

    max_log2: int = 12
    """Longest bucket is 2^max_log2 tokens; the schedule's seq_len must equal it (the target context)."""

    cycles: int = Field(default=8, ge=1)
    """Each bucket's share of the run is split into this many cycles; within a cycle buckets are
    drawn by their odds (knob bucket_odds) until none has a whole batch left (Algorithm 1)."""

    repeat: bool = False
    """A run needing more tokens than the buckets hold: false refuses it at plan time; true starts a
    new epoch of every bucket (reshuffled) when they run dry, and logs it."""

    @model_validator(mode="after")
    def _range(self) -> BucketsConfig:
        if not 1 <= self.min_log2 <= self.max_log2 <= 24:
            raise ValueError(
                f"data.buckets needs 1 <= min_log2 <= max_log2 <= 24, got {self.min_log2}..{self.max_log2}"
            )
        return self


class SourceConfig(Section):
    """One corpus of a mixture (``data.sources``): any source ``data.source`` takes, prepared with the
    mixture's one tokenizer, with its own validation split."""

    source: str
    """The corpus, as for data.source: `stdlib`, a text folder or file, .jsonl/.parquet/.arrow files, or a
    Hugging Face `datasets` folder."""

    text_field: str = "text"
    """The JSONL field, or Parquet/Arrow column, holding each document's text."""

    split: str | None = None
    """The split of a Hugging Face `DatasetDict` folder to read."""

    max_files: int | None = Field(default=None, ge=1)
    """Use only the first N files of the source (sorted by path)."""

    subset: Duration | None = None
    """Train on a fixed subset of this many tokens of the source (e.g. `2M tok`): whole documents drawn
    once in a seeded order that does not depend on the run's seed, served for as many epochs as the run
    asks (a small high-quality set repeated). Unset: the whole source."""

    repeat: bool | None = None
    """What happens when the run needs more of this source than it holds: true starts a new epoch
    (reshuffled), false makes running dry a plan-time error. Unset: data.buckets.repeat for the buckets
    sampler; true (a new epoch, as with one source) for the staged and fixed samplers."""

    tokenizer: str | None = None
    """A tokenizer.json this source was meant for; it must be the mixture's own (data.tokenizer.path, or
    the one trained on the union of the sources): a check, never a second tokenizer."""

    @field_validator("subset")
    @classmethod
    def _subset_in_tokens(cls, v: Duration | None) -> Duration | None:
        if v is not None and (v.unit is not Unit.TOKEN or v.value < 1):
            raise ValueError(f"subset takes a positive number of tokens, e.g. '2M tok', got '{v}'")
        return v


_SOURCE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_PER_SOURCE = ("source", "text_field", "split", "max_files")


class DataConfig(Section):
    """The training corpus and how it is prepared (tokenized once, cached on disk)."""

    source: str = "stdlib"
    """The corpus: `stdlib` (this Python's standard library, an embedded default), a path to
    a file or folder of text files (.txt, .md, .py, ...), .jsonl, .parquet or .arrow files, or a
    Hugging Face `datasets` folder written by `save_to_disk` (read as its Arrow files)."""

    text_field: str = "text"
    """The JSONL field, or the Parquet or Arrow column, that holds each document's text."""

    split: str | None = None
    """The split of a Hugging Face `DatasetDict` folder to read (e.g. `train`); needed for such a
    folder, refused for any other source. rampup holds out its own validation documents from it."""

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

    sampler: Literal["staged", "fixed", "buckets"] = "staged"
    """How batches are cut: `staged` (one token stream cut at whatever seq_len the schedule asks
    for), `fixed` (the classic fixed-length baseline: shuffled windows of one seq_len) or `buckets`
    (dataset decomposition: every step one length bucket, sequences from single documents)."""

    buckets: BucketsConfig = Field(default_factory=BucketsConfig)
    """Length buckets for data.sampler: buckets."""

    sources: dict[str, SourceConfig] | None = None
    """Several corpora mixed by the `mix` knob: `{name: {source: ..., subset: ..., repeat: ...}}`. Each is
    prepared into its own shards with one shared tokenizer and keeps its own validation split;
    evaluation reports the loss of each. Exclusive with data.source (its one-source shorthand)."""

    doc_mask: bool = False
    """Packed windows (fixed/staged samplers): attend only within each document (the end-of-text
    token closes a document) instead of across the whole window."""

    restart_positions: bool = False
    """With doc_mask: RoPE positions restart at 0 at every document start."""

    on_undecodable: Literal["skip", "error", "replace"] = "skip"
    """An input file (or JSONL line) that is not valid UTF-8: `skip` leaves it out (counted in
    meta.json and printed by `rampup prepare`), `error` stops with its path and byte offset,
    `replace` keeps it with the bad bytes as U+FFFD."""

    verify_checksums: bool = True
    """Read every token shard in full when it is opened: compare its sha256 with meta.json and check
    every token id is below the vocabulary size (about 1 GB/s). false skips both; the document
    index and shard sizes are always checked."""

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        if self.sources is None:
            return self
        if not self.sources:
            raise ValueError("data.sources is empty; name at least one source, or use data.source for one corpus")
        bad = [n for n in self.sources if not _SOURCE_NAME.match(n)]
        if bad:
            raise ValueError(
                f"data.sources: the name {bad[0]!r} is not a plain name; use letters, digits, '_' and '-', "
                "starting with a letter (it names the source in the mix knob, metrics and --on)"
            )
        # against the defaults, not the keys set: a saved run config holds every key at its value
        shared = [k for k in _PER_SOURCE if getattr(self, k) != type(self).model_fields[k].default]
        if shared:
            raise ValueError(
                f"data.{shared[0]} and data.sources are exclusive: with several sources, set "
                f"{shared[0]} under each source (data.sources.NAME.{shared[0]}); data.source is the "
                "one-source shorthand"
            )
        return self

    @model_validator(mode="after")
    def _packing(self) -> DataConfig:
        if self.restart_positions and not self.doc_mask:
            raise ValueError(
                "data.restart_positions needs data.doc_mask: true (positions restart "
                "per document only when attention is masked per document)"
            )
        if self.doc_mask and self.sampler == "buckets":
            raise ValueError(
                "data.doc_mask is for packed windows; the buckets sampler never packs "
                "two documents into one sequence, so remove doc_mask"
            )
        return self

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction_in_range(cls, v: float) -> float:
        if not 0.0 < v < 0.5:
            raise ValueError(f"data.val_fraction must be between 0 and 0.5 (exclusive), got {v}")
        return v

    def source_configs(self) -> dict[str, DataConfig]:
        """{name: the one-source DataConfig of each source} (the shared settings copied); one source
        ``main`` for the shorthand. Their tokenizer is set by :func:`rampup.data.mixture.prepare_sources`."""
        if self.sources is None:
            return {"main": self}
        shared = self.model_dump(exclude={"sources", *_PER_SOURCE})
        return {
            name: DataConfig.model_validate(shared | src.model_dump(include=set(_PER_SOURCE), exclude_none=True))
            for name, src in self.sources.items()
        }
