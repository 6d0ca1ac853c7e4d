"""rampup's data pipeline: prepare a local corpus into token shards, then sample batches from it.

cfg = DataConfig(source="path/to/texts")
folder = get_prepared(cfg)                       # tokenized once, cached by settings
train = TokenDataset.open(folder, "train")
sampler = build_sampler(cfg.sampler, train, seed=0, seq_len=256)
x, y = sampler.next_batch(seq_len=128, batch_size=8)   # (8, 128) int64 each
"""

from rampup.data.config import DataConfig, TokenizerConfig
from rampup.data.corpus import CorpusStats, iter_documents, resolve_source, stdlib_files
from rampup.data.dataset import TokenDataset
from rampup.data.prepare import (
    FORMAT_VERSION,
    get_prepared,
    load_prepared_tokenizer,
    prepare,
    prepared_dir,
    read_meta,
)
from rampup.data.samplers import (
    SAMPLERS,
    FixedSampler,
    Sampler,
    StagedSampler,
    build_sampler,
    eval_windows,
)
from rampup.data.tokenizer import EOT, load_tokenizer, train_tokenizer

__all__ = [
    "EOT",
    "FORMAT_VERSION",
    "SAMPLERS",
    "CorpusStats",
    "DataConfig",
    "FixedSampler",
    "Sampler",
    "StagedSampler",
    "TokenDataset",
    "TokenizerConfig",
    "build_sampler",
    "eval_windows",
    "get_prepared",
    "iter_documents",
    "load_prepared_tokenizer",
    "load_tokenizer",
    "prepare",
    "prepared_dir",
    "read_meta",
    "resolve_source",
    "stdlib_files",
    "train_tokenizer",
]
