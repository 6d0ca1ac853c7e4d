"""Document-masked packing: windows of concatenated documents in which attention stops at the
document boundaries.

Each document in a packed (B, T) window ends in EOT; a token attends only to the earlier tokens of its
own document, and its RoPE position may restart at 0 where the document starts.

    seg = segment_ids(x, eot_id)                    # (B, T) document index within the row
    pos = document_positions(seg)                   # (B, T) 0, 1, ... from each document start
    logits = model(x, positions=pos, attn_mask=document_mask(seg))   # dense (B, 1, T, T) mask
    logits = model(x, positions=pos, segments=seg)                    # per-document SDPA calls

``document_mask`` is one SDPA call that still computes the full T x T square; ``document_spans`` +
``per_document_attention`` make one causal call per document (sum(len^2) / 2, one host sync per forward).
``document_block_mask`` (flex_attention) has no backward on CPU: inference or CUDA. See docs/curricula.md.
"""

from __future__ import annotations

import torch

# the attention side lives with the model, which must not depend on the data package
from rampup.models.docmask import (  # noqa: F401  (re-exported)
    DocumentSpans,
    document_block_mask,
    document_mask,
    document_spans,
    per_document_attention,
    starts_of,
)


def segment_ids(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Document index of each token within its row: (B, T) token ids -> (B, T) long.

    Counting starts at 0 in every row; the EOT token belongs to the document it ends, the token
    after it starts the next one.
    """
    eot = (x == eot_id).long()  # (B, T)
    return eot.cumsum(dim=1) - eot  # EOTs strictly before each token


def document_positions(seg: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) long position of each token within its own document."""
    t = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)  # (B, T)
    first = torch.where(starts_of(seg), t, 0).cummax(dim=1).values  # start of the current document
    return t - first
