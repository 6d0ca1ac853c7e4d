"""Document-masked packing: windows of concatenated documents in which attention stops at the
document boundaries.

A packed window (B, T) holds pieces of several documents, each ending in the EOT token. Here a
token may attend only to the earlier tokens of its own document, and its RoPE position can
restart at 0 where its document starts, so each document is seen as if it were alone. (RoPE
scores depend only on relative positions, so once attention is masked per document the restart
changes the logits by rounding only; it matters for absolute positions or without the mask.)

    seg = segment_ids(x, eot_id)                    # (B, T) document index within the row
    pos = document_positions(seg)                   # (B, T) 0, 1, ... from each document start
    logits = model(x, positions=pos, attn_mask=document_mask(seg))   # dense (B, 1, T, T) mask
    logits = model(x, positions=pos, segments=seg)                    # per-document SDPA calls

Two ways to run the attention:

- ``document_mask``: a dense block-diagonal causal bool mask for SDPA. One kernel call, but SDPA
  cannot skip the masked blocks as it does for ``is_causal``, so it computes the full T x T square.
- ``document_spans`` + ``per_document_attention``: one causal SDPA call per document slice
  (batched over rows that share their boundaries), so the work is sum(len^2) / 2 instead of T^2.
  Building the spans reads the boundaries on the host: device syncs once per forward.

``document_block_mask`` builds the same mask as a flex_attention BlockMask. On CPU (torch 2.13)
flex_attention has no backward pass at all, so it is for inference or for CUDA.
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
