"""Attention patterns: the block-banded kernel and the per-layer model path against dense masks."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_tree
from rampup.config import RunConfig
from rampup.engine.records import read_metrics
from rampup.engine.trainer import train
from rampup.errors import ConfigError
from rampup.models.attention import (
    AttentionSpec,
    Pattern,
    banded_attention,
    layer_patterns,
    masked_pattern_attention,
    pattern_mask,
)
from rampup.models.llm import DecoderLM, ModelConfig


@pytest.mark.parametrize(
    "T, window, n_global, H, KV",
    [
        (37, 8, 0, 4, 2),  # T not a multiple of the window, grouped-query attention
        (64, 16, 4, 2, 2),  # sinks + window
        (10, 16, 2, 2, 1),  # window longer than the sequence: plain causal
        (33, 1, 0, 2, 2),  # each token sees only itself
        (50, 7, 3, 4, 4),
    ],
)
def test_banded_matches_the_dense_masked_reference(T, window, n_global, H, KV):
    torch.manual_seed(T)
    q = torch.randn(2, H, T, 8, requires_grad=True)
    k = torch.randn(2, KV, T, 8, requires_grad=True)
    v = torch.randn(2, KV, T, 8, requires_grad=True)
    p = Pattern(window, n_global)
    y = banded_attention(q, k, v, p)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1), attn_mask=pattern_mask(T, p)
    )
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dense_reference_is_what_the_patterns_say():
    m = pattern_mask(6, Pattern(window=2, n_global=1))
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ]


def test_hybrid_layer_patterns():
    p = layer_patterns(AttentionSpec(kind="window", full_every=3), 32, 6)
    assert [x is None for x in p] == [False, False, True, False, False, True]
    p = layer_patterns(AttentionSpec(kind="sinks", n_global=4, full_layers=[0]), 16, 3)
    assert p == [None, Pattern(16, 4), Pattern(16, 4)]
    assert layer_patterns(AttentionSpec(), 0, 2) == [None, None]
    with pytest.raises(ValueError, match="names layers \\[3\\]"):
        layer_patterns(AttentionSpec(kind="window", full_layers=[3]), 8, 2)


def test_model_banded_path_matches_dense_path_with_document_masks():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64))
    model.set_attention(layer_patterns(AttentionSpec(kind="sinks", n_global=2, full_every=3), 8, 3))
    x = torch.randint(0, 64, (2, 40))
    banded = model(x)
    dense = model(x, attn_mask=torch.ones(1, 1, 40, 40, dtype=torch.bool))  # the mask path: dense pattern
    torch.testing.assert_close(banded, dense, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(banded.square().mean(), list(model.parameters()))
    gb = torch.autograd.grad(dense.square().mean(), list(model.parameters()))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a pattern really restricts attention: logits differ from full causal attention
    model.set_attention([None] * 3)
    assert not torch.allclose(model(x), banded, atol=1e-4)
    # document segments combine with the window (each token: its own document and its window)
    seg = torch.zeros(2, 40, dtype=torch.long)
    seg[:, 20:] = 1
    model.set_attention(layer_patterns(AttentionSpec(kind="window"), 8, 3))
    first = model(x[:, :20])
    torch.testing.assert_close(model(x, segments=seg)[:, :20], first, rtol=1e-5, atol=1e-5)


def test_windowed_stage_is_applied_and_bad_windows_are_refused(data_cache, tmp_path):
    tree = tiny_tree(
        data_cache, tmp_path / "out", train={"duration": "16 steps", "checkpoint_every": None}, log={"progress": "off"}
    )
    tree["schedule"]["stages"][1] |= {
        "attention": {"kind": "sinks", "n_global": 4, "full_every": 2},
        "window": {"from": 32, "to": 128, "ramp": "linear"},
    }
    train(RunConfig.model_validate(tree))
    stage = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r["event"] == "stage"][1]
    assert stage["knobs"]["attention"] == {"kind": "sinks", "full_every": 2} and stage["knobs"]["window"] == 32

    tree["train"]["out_dir"] = str(tmp_path / "bad")
    tree["schedule"]["stages"][1]["window"] = 512
    with pytest.raises(ConfigError, match="window 512 is larger than the sequence"):
        train(RunConfig.model_validate(tree))
    tree["schedule"]["stages"][1]["window"] = 0
    with pytest.raises(ConfigError, match="set window"):
        train(RunConfig.model_validate(tree))
    tree["schedule"]["stages"][1]["attention"] = {"kind": "window", "full_layers": [7]}
    with pytest.raises(ValueError, match="names layers \\[7\\]"):
        RunConfig.model_validate(tree)
    assert not (tmp_path / "bad").exists()


def capped_reference(q_raw, k_raw, v, pattern, cos, sin):
    """LM-Infinite written out pair by pair: query i, key j scored at RoPE distance i - j inside the
    window and at distance ``window`` for the global tokens outside it (q rotated at that distance,
    k at 0); then the Lambda mask, softmax and values."""
    from rampup.models.llm import apply_rope

    T, hd = q_raw.shape[2], q_raw.shape[3]
    rep = q_raw.shape[1] // k_raw.shape[1]
    k0 = apply_rope(k_raw, cos[0], sin[0]).repeat_interleave(rep, 1)
    scores = torch.empty(q_raw.shape[0], q_raw.shape[1], T, T)
    for i in range(T):
        for j in range(i + 1):
            d = i - j if i - j < pattern.window else pattern.window
            qi = apply_rope(q_raw[:, :, i], cos[d], sin[d])
            scores[:, :, i, j] = (qi * k0[:, :, j]).sum(-1) * hd**-0.5
    mask = pattern_mask(T, pattern)
    att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return att @ v.repeat_interleave(rep, 1)


@pytest.mark.parametrize("T, window, n_global, H, KV", [(23, 5, 2, 4, 2), (16, 4, 3, 2, 2), (12, 3, 1, 2, 1)])
def test_capped_global_distance_matches_the_pairwise_reference(T, window, n_global, H, KV):
    """Capped sinks (LM-Infinite): the banded kernel and the dense masked path both equal the
    pair-by-pair definition, outputs and gradients, and differ from true-distance sinks."""
    from rampup.models.llm import apply_rope, precompute_rope

    torch.manual_seed(T)
    hd = 8
    cos, sin = precompute_rope(hd, 64)
    q_raw = torch.randn(2, H, T, hd, requires_grad=True)
    k_raw = torch.randn(2, KV, T, hd, requires_grad=True)
    v = torch.randn(2, KV, T, hd, requires_grad=True)
    p = Pattern(window, n_global, capped=True)
    q, k = apply_rope(q_raw, cos[:T], sin[:T]), apply_rope(k_raw, cos[:T], sin[:T])
    q_cap, k_cap = apply_rope(q_raw, cos[window], sin[window]), apply_rope(k_raw[:, :, :n_global], cos[0], sin[0])
    ref = capped_reference(q_raw, k_raw, v, p, cos, sin)
    banded = banded_attention(q, k, v, p, q_cap, k_cap)
    dense = masked_pattern_attention(q, k, v, torch.ones(1, 1, T, T, dtype=torch.bool).tril(), p, q_cap, k_cap)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q_raw, k_raw, v), g, retain_graph=True)
    for y in (banded, dense):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(y, (q_raw, k_raw, v), g, retain_graph=True), want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(banded_attention(q, k, v, Pattern(window, n_global)), banded, atol=1e-3)


def test_model_with_capped_sinks():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    x = torch.randint(0, 64, (2, 40))
    spec = AttentionSpec(kind="sinks", n_global=2, capped_distance=True)
    model.set_attention(layer_patterns(spec, 8, 2))
    capped = model(x)
    torch.testing.assert_close(
        capped, model(x, attn_mask=torch.ones(1, 1, 40, 40, dtype=torch.bool)), rtol=1e-5, atol=1e-5
    )  # banded and dense-mask paths agree
    model.set_attention(layer_patterns(AttentionSpec(kind="sinks", n_global=2), 8, 2))
    uncapped = model(x)
    torch.testing.assert_close(capped[:, :8], uncapped[:, :8])  # before position `window` nothing changes
    assert not torch.allclose(capped[:, 20:], uncapped[:, 20:], atol=1e-4)
    assert str(spec) == "sinks(2, capped)"
    with pytest.raises(ValueError, match="capped_distance applies to the global tokens"):
        AttentionSpec(kind="window", capped_distance=True)
