"""Passkey-retrieval examples (RULER-style, generated from the corpus's own text as filler): a random
5-digit key is stated once at a chosen depth of a window of text, and the window ends with a question;
the model must predict every token of the key. Scored by rampup.engine.evaluation.passkey_accuracy;
mixed into training by the ``passkey_fraction`` knob (:func:`inject_passkeys`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from rampup.errors import ConfigError, DataError

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."


QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyTemplate:
    """The task's token pieces for one tokenizer; keys are encoded per example."""

    tok: Tokenizer

    def pieces(self, key: int) -> tuple[list[int], list[int], list[int]]:
        """(needle, question, answer) token ids for ``key``."""
        needle = self.tok.encode(NEEDLE.format(key=key)).ids
        question = self.tok.encode(QUESTION).ids
        answer = self.tok.encode(f" {key}").ids
        return needle, question, answer

    def min_len(self) -> int:
        """Shortest window that holds the needle, the question and the answer, with a little filler."""
        n, q, a = self.pieces(99999)
        return len(n) + len(q) + len(a) + 8


def passkey_example(
    filler: np.ndarray, seq_len: int, depth: float, key: int, template: PasskeyTemplate
) -> tuple[np.ndarray, int]:
    """(seq_len + 1 tokens, number of answer tokens at the end) with the needle at ``depth`` in [0, 1].

    The tokens are: filler[:a] + needle + filler[a:f] + question + answer, so the answer is
    predicted by the last positions of x = tokens[:-1] (targets y = tokens[1:]).
    """
    needle, question, answer = template.pieces(key)
    n_fill = seq_len + 1 - len(needle) - len(question) - len(answer)
    if n_fill < 1:
        raise ConfigError(
            f"a passkey example needs more than {seq_len} tokens with this tokenizer; "
            f"use lengths >= {template.min_len()}"
        )
    if len(filler) < n_fill:
        raise DataError(f"passkey filler has {len(filler)} tokens, {n_fill} needed")
    a = int(round(depth * n_fill))
    out = np.concatenate([filler[:a], needle, filler[a:n_fill], question, answer]).astype(np.int64)
    return out, len(answer)


def inject_passkeys(
    x: torch.Tensor, y: torch.Tensor, fraction: float, template: PasskeyTemplate, rng: np.random.Generator
) -> int:
    """Turn about ``fraction`` of the rows of (x, y) (B, T) into passkey examples, in place.

    Each chosen row keeps its own tokens as filler; rows too short for the task are left alone.
    Returns the number of rows changed.
    """
    B, T = x.shape
    if fraction <= 0 or T < template.min_len():
        return 0
    chosen = np.flatnonzero(rng.random(B) < fraction)
    for b in chosen.tolist():
        filler = torch.cat([x[b], y[b, -1:]]).numpy()
        ex, _ = passkey_example(filler, T, float(rng.random()), int(rng.integers(10000, 99999)), template)
        t = torch.from_numpy(ex)
        x[b], y[b] = t[:-1], t[1:]
    return len(chosen)
