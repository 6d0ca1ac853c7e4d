"""A byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained locally or loaded from disk."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rampup.errors import ConfigError, DataError

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``EOT`` as its only special token (deterministic for a corpus).

    Every byte is in the initial alphabet, so any text encodes without unknown tokens.
    """
    if vocab_size < 257:
        raise ConfigError(f"data.tokenizer.vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; a missing or unreadable file is a DataError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"tokenizer file '{path}' does not exist (data.tokenizer.path)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise DataError(f"tokenizer file '{path}' is not a valid tokenizer.json: {e}") from None


def eot_id(tok: Tokenizer, token: str = EOT) -> int:
    """The id of the end-of-text ``token``; a loaded tokenizer without it cannot mark document ends."""
    i = tok.token_to_id(token)
    if i is None:
        raise DataError(
            f"the tokenizer has no '{token}' token, which rampup uses to end every document; "
            "add it as a special token, name the tokenizer's own end-of-text token in data.tokenizer.eot, "
            "or let rampup train a tokenizer (unset data.tokenizer.path)"
        )
    return i


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (their models: vocabulary and merges), whatever
    their special-token or template settings."""

    return json.loads(a.to_str()).get("model") == json.loads(b.to_str()).get("model")
