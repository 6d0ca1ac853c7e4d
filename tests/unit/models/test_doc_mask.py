"""Tests of document-masked packing (rampup.data.packing) and the model's two masked paths:
a packed window must give each document the logits it gets alone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from rampup.data.packing import (
    DocumentSpans,
    document_block_mask,
    document_mask,
    document_positions,
    document_spans,
    per_document_attention,
    segment_ids,
)
from rampup.models import DecoderLM, ModelConfig

EOT = 3
VOCAB = 64
T = 32
# Each row: document lengths; every document ends in EOT except a row's last, which the window
# cuts short. Row 0 has a one-token document (a lone EOT), row 1 starts with a whole-row run.
ROWS = [[7, 1, 12, 5, 7], [20, 12], [32]]
BACKENDS = ["attn_mask", "segments"]


def tiny() -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=T)
    return DecoderLM(cfg).eval()


def packed_batch(seed: int = 0) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
    """(len(ROWS), T) token ids of packed documents, and each row's (start, end) spans."""
    g = torch.Generator().manual_seed(seed)
    rows, spans = [], []
    for lengths in ROWS:
        docs, row_spans, start = [], [], 0
        for i, n in enumerate(lengths):
            doc = torch.randint(EOT + 1, VOCAB, (n,), generator=g)
            if i < len(lengths) - 1:
                doc[-1] = EOT
            docs.append(doc)
            row_spans.append((start, start + n))
            start += n
        assert start == T
        rows.append(torch.cat(docs))
        spans.append(row_spans)
    return torch.stack(rows), spans


def doc_kwargs(x: torch.Tensor, backend: str, restart_positions: bool = True) -> dict:
    seg = segment_ids(x, EOT)
    kw = {"positions": document_positions(seg)} if restart_positions else {}
    if backend == "attn_mask":
        return {**kw, "attn_mask": document_mask(seg)}
    return {**kw, "segments": seg}


# ----------------------------------------------------------------------------- the pure functions


def test_segment_ids_hand_written():
    x = torch.tensor(
        [
            [5, 3, 7, 8, 3, 3, 9],  # EOTs end documents; a lone EOT is a document
            [5, 6, 7, 8, 9, 5, 6],  # no EOT: one document
            [3, 4, 4, 4, 4, 4, 3],
        ]
    )  # EOT first: a one-token document, then the next
    expected = torch.tensor([[0, 0, 1, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(segment_ids(x, eot_id=3), expected)


def test_document_positions_hand_written():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0], [4, 4, 5, 5, 5, 5, 5]])  # ids need not start at 0
    expected = torch.tensor([[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 6], [0, 1, 0, 1, 2, 3, 4]])
    torch.testing.assert_close(document_positions(seg), expected)


def test_document_mask_hand_written():
    seg = torch.tensor([[0, 0, 1, 1]])
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    mask = document_mask(seg)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    torch.testing.assert_close(mask[0, 0], expected)


def test_document_spans_group_rows_with_equal_bounds():
    seg = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    spans = document_spans(seg)
    assert spans == DocumentSpans(5, 4, ((0, 2, (0, 4)), (2, 4, (0, 2, 4)), (4, 5, (0, 4))))
    assert spans.n_calls == 4


def test_document_spans_rejects_non_contiguous_documents():
    with pytest.raises(ValueError, match="non-decreasing"):
        document_spans(torch.tensor([[0, 1, 0]]))


@pytest.mark.parametrize("n_kv", [4, 2])
def test_per_document_attention_equals_masked_sdpa_with_grads(n_kv):
    x, _ = packed_batch()
    seg = segment_ids(x, EOT)
    g = torch.Generator().manual_seed(0)
    B, H, hd = x.shape[0], 4, 8
    q = torch.randn(B, H, T, hd, generator=g, requires_grad=True)
    k, v = (torch.randn(B, n_kv, T, hd, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, H, T, hd, generator=g)
    gqa = n_kv != H

    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seg), enable_gqa=gqa)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    got = per_document_attention(q, k, v, document_spans(seg), enable_gqa=gqa)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
    # plain causal attention differs: the masking is doing something
    assert not torch.allclose(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), ref)


def test_per_document_attention_checks_shape():
    q = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="spans are for"):
        per_document_attention(q, q, q, document_spans(torch.zeros(3, 8, dtype=torch.long)))


def test_flex_block_mask_forward_equals_masked_sdpa():
    """On CPU flex_attention runs forward only (no backward in torch 2.13); eager, it must agree."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    x, _ = packed_batch()
    seg = segment_ids(x, EOT)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(x.shape[0], 4, T, 8, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile"
        got = flex.flex_attention(q, k, v, block_mask=document_block_mask(seg, block_size=8))
    torch.testing.assert_close(got, ref)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_equal_documents_alone(backend):
    m = tiny()
    x, spans = packed_batch()
    with torch.no_grad():
        logits = m(x, **doc_kwargs(x, backend))  # (B, T, V)
        for b, row_spans in enumerate(spans):
            for s, e in row_spans:
                torch.testing.assert_close(logits[b, s:e], m(x[b : b + 1, s:e])[0])  # positions 0..n-1
        # without document masking the later documents see the earlier ones
        plain = m(x, positions=document_positions(segment_ids(x, EOT)))
        s, e = spans[0][-1]
        assert not torch.allclose(plain[0, s:e], logits[0, s:e])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_without_position_restart_equals_offset_positions(backend):
    """RoPE sees only relative positions, so (up to rounding) this also equals the document at
    positions 0..n-1: with exact document masking, restarting positions is not what isolates them."""
    m = tiny()
    x, spans = packed_batch()
    with torch.no_grad():
        logits = m(x, **doc_kwargs(x, backend, restart_positions=False))
        for b, row_spans in enumerate(spans):
            for s, e in row_spans:
                alone = m(x[b : b + 1, s:e], positions=torch.arange(s, e)[None])[0]
                torch.testing.assert_close(logits[b, s:e], alone)


def test_segments_and_attn_mask_paths_agree_with_grads():
    m = tiny().train()
    x, _ = packed_batch(seed=1)
    y = torch.roll(x, -1, dims=1)
    results = {}
    for backend in BACKENDS:
        m.zero_grad(set_to_none=True)
        logits = m(x, **doc_kwargs(x, backend))
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        results[backend] = (logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    (l_mask, g_mask), (l_seg, g_seg) = results["attn_mask"], results["segments"]
    torch.testing.assert_close(l_seg, l_mask)
    assert g_seg.keys() == g_mask.keys()
    for name in g_mask:
        torch.testing.assert_close(g_seg[name], g_mask[name], msg=lambda s, n=name: f"{n}: {s}")
    assert any(g.abs().sum() > 0 for g in g_mask.values())


def test_segments_argument_checks():
    m = tiny()
    x, _ = packed_batch()
    seg = segment_ids(x, EOT)
    with pytest.raises(ValueError, match="not both"):
        m(x, attn_mask=document_mask(seg), segments=seg)
    with pytest.raises(ValueError, match="shape"):
        m(x, segments=seg[:, :-1])
