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

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def segment_ids(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Document index of each token within its row: (B, T) token ids -> (B, T) long.

    Counting starts at 0 in every row; the EOT token belongs to the document it ends, the token
    after it starts the next one.
    """
    eot = (x == eot_id).long()  # (B, T)
    return eot.cumsum(dim=1) - eot  # EOTs strictly before each token


def _starts(seg: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at the first token of each document (and at t = 0)."""
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return start


def document_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool, True where key j may be attended from query i:
    same document and j <= i."""
    T = seg.shape[1]
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return (same & causal).unsqueeze(1)


def document_positions(seg: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) long position of each token within its own document."""
    t = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)  # (B, T)
    first = torch.where(_starts(seg), t, 0).cummax(dim=1).values  # start of the current document
    return t - first


@dataclass(frozen=True)
class DocumentSpans:
    """Where the documents of a (B, T) batch lie, as host-side integers.

    ``groups`` lists runs of consecutive rows that share the same document boundaries, in row
    order: (first row, end row, bounds), bounds = (0, start of document 2, ..., T). Rows without
    a boundary (the common case when documents are longer than T) merge into one batched call.
    """

    batch_size: int
    seq_len: int
    groups: tuple[tuple[int, int, tuple[int, ...]], ...]

    @property
    def n_calls(self) -> int:
        """SDPA calls per attention layer."""
        return sum(len(b) - 1 for _, _, b in self.groups)


def document_spans(seg: torch.Tensor) -> DocumentSpans:
    """The per-document attention plan of (B, T) segment ids, read on the host (syncs with the device).

    Documents must be contiguous runs of equal ids, as ``segment_ids`` makes them.
    """
    B, T = seg.shape
    if T > 1 and not bool((seg[:, 1:] >= seg[:, :-1]).all()):
        raise ValueError("segment ids must be non-decreasing along each row (see segment_ids)")
    rows, cols = _starts(seg)[:, 1:].nonzero(as_tuple=True)
    starts: list[list[int]] = [[0] for _ in range(B)]
    for r, c in zip(rows.tolist(), (cols + 1).tolist()):
        starts[r].append(c)
    groups: list[tuple[int, int, tuple[int, ...]]] = []
    for r in range(B):
        bounds = (*starts[r], T)
        if groups and groups[-1][2] == bounds:
            groups[-1] = (groups[-1][0], r + 1, bounds)
        else:
            groups.append((r, r + 1, bounds))
    return DocumentSpans(B, T, tuple(groups))


def per_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           spans: DocumentSpans, *, enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention within each document: q (B, H, T, hd), k/v (B, KV, T, hd) -> (B, H, T, hd).

    The same result as SDPA with ``document_mask``, computed as one ``is_causal`` SDPA call per
    document slice. The slices come from ``split``, whose backward is one concatenation (indexing
    would make every slice's backward write a zero-filled gradient of the full size).
    """
    if (q.shape[0], q.shape[2]) != (spans.batch_size, spans.seq_len):
        raise ValueError(f"spans are for (B, T) = ({spans.batch_size}, {spans.seq_len}), "
                         f"q has B = {q.shape[0]}, T = {q.shape[2]}")
    rows = [r1 - r0 for r0, r1, _ in spans.groups]
    outs = []
    for qg, kg, vg, (_, _, bounds) in zip(q.split(rows), k.split(rows), v.split(rows), spans.groups):
        lengths = [e - s for s, e in zip(bounds, bounds[1:])]
        pieces = [F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=enable_gqa)
                  for qd, kd, vd in zip(qg.split(lengths, dim=2), kg.split(lengths, dim=2),
                                        vg.split(lengths, dim=2))]  # each (rows, H, length, hd)
        outs.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def document_block_mask(seg: torch.Tensor, block_size: int = 128):
    """``document_mask`` as a flex_attention BlockMask for (B, T) segment ids, on seg's device.

    Fully masked (block_size x block_size) tiles are skipped by flex_attention. On CPU, torch 2.13
    runs flex_attention forward only (eager: an unfused reference; compiled: a fused kernel).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = seg.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

    return create_block_mask(same_document_causal, B, None, T, T, device=seg.device,
                             BLOCK_SIZE=block_size)
