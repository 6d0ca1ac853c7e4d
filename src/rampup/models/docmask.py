"""Attention within documents of a packed batch: the model-side half of document masking.

The data side (:mod:`rampup.data.packing`) finds the documents of a (B, T) window (``segment_ids``,
``document_positions``); this module turns segment ids into what attention needs, with no device
sync inside the model's forward when the spans are computed beforehand:

- ``document_mask``: a dense block-diagonal causal bool mask for SDPA (one call, full T x T work);
- ``document_spans`` (read on the host) + ``per_document_attention``: one causal SDPA call per
  document slice, so the work is sum(len^2) / 2 instead of T^2;
- ``document_block_mask``: the same mask as a flex_attention BlockMask (forward only on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def starts_of(seg: torch.Tensor) -> torch.Tensor:
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

    def rows(self, i: int, j: int) -> DocumentSpans:
        """The spans of rows i..j (a micro-batch), rows renumbered from 0."""
        j = min(j, self.batch_size)
        groups = tuple((max(r0, i) - i, min(r1, j) - i, b) for r0, r1, b in self.groups if r0 < j and r1 > i)
        return DocumentSpans(j - i, self.seq_len, groups)

    def segment_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(B, T) long document index of each token (as segment_ids of the data side)."""
        seg = torch.empty(self.batch_size, self.seq_len, dtype=torch.long)
        for r0, r1, bounds in self.groups:
            for n, (s, e) in enumerate(pairwise(bounds)):
                seg[r0:r1, s:e] = n
        return seg.to(device)

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
    rows, cols = starts_of(seg)[:, 1:].nonzero(as_tuple=True)
    starts: list[list[int]] = [[0] for _ in range(B)]
    for r, c in zip(rows.tolist(), (cols + 1).tolist(), strict=True):
        starts[r].append(c)
    groups: list[tuple[int, int, tuple[int, ...]]] = []
    for r in range(B):
        bounds = (*starts[r], T)
        if groups and groups[-1][2] == bounds:
            groups[-1] = (groups[-1][0], r + 1, bounds)
        else:
            groups.append((r, r + 1, bounds))
    return DocumentSpans(B, T, tuple(groups))


def per_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: DocumentSpans, *, enable_gqa: bool = False
) -> torch.Tensor:
    """Causal attention within each document: q (B, H, T, hd), k/v (B, KV, T, hd) -> (B, H, T, hd).

    The same result as SDPA with ``document_mask``, computed as one ``is_causal`` SDPA call per
    document slice. The slices come from ``split``, whose backward is one concatenation (indexing
    would make every slice's backward write a zero-filled gradient of the full size).
    """
    if (q.shape[0], q.shape[2]) != (spans.batch_size, spans.seq_len):
        raise ValueError(
            f"spans are for (B, T) = ({spans.batch_size}, {spans.seq_len}), q has B = {q.shape[0]}, T = {q.shape[2]}"
        )
    rows = [r1 - r0 for r0, r1, _ in spans.groups]
    outs = []
    for qg, kg, vg, (_, _, bounds) in zip(q.split(rows), k.split(rows), v.split(rows), spans.groups, strict=True):
        lengths = [e - s for s, e in pairwise(bounds)]
        pieces = [
            F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=enable_gqa)
            for qd, kd, vd in zip(
                qg.split(lengths, dim=2), kg.split(lengths, dim=2), vg.split(lengths, dim=2), strict=True
            )
        ]  # each (rows, H, length, hd)
        outs.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def document_block_mask(seg: torch.Tensor, block_size: int = 128) -> BlockMask:
    """``document_mask`` as a flex_attention BlockMask for (B, T) segment ids, on seg's device.

    Fully masked (block_size x block_size) tiles are skipped by flex_attention. On CPU, torch 2.13
    runs flex_attention forward only (eager: an unfused reference; compiled: a fused kernel).
    """

    B, T = seg.shape

    def same_document_causal(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

    return create_block_mask(same_document_causal, B, None, T, T, device=seg.device, BLOCK_SIZE=block_size)
