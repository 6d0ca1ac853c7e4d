"""Tests of the reference decoder LM: shapes, causality, RoPE, masking, Hugging Face parity."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from conftest import to_hf_state
from rampup.errors import ConfigError
from rampup.models import DecoderLM, ModelConfig, flops_per_token
from rampup.models.llm import Attention, apply_rope, precompute_rope, rope_inv_freq

TINY = dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)


def tiny(**kw) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**{**TINY, **kw})).eval()


def tokens(B=2, T=16, vocab=100, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- shapes and causality


def test_forward_shapes():
    m = tiny()
    idx = tokens()
    h = m.forward_hidden(idx)
    assert h.shape == (2, 16, 32)
    assert m.logits(h).shape == (2, 16, 100)
    torch.testing.assert_close(m(idx), m.logits(h), rtol=0, atol=0)


def test_causal():
    m = tiny()
    idx = tokens(B=1, T=12)
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % 100
    a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


# ----------------------------------------------------------------------------- attention and RoPE


def test_gqa_matches_explicit_reference():
    cfg = ModelConfig(**{**TINY, "dim": 64, "n_heads": 8, "n_kv_heads": 2})
    torch.manual_seed(0)
    attn = Attention(cfg)
    B, T, H, KV, hd = 2, 10, 8, 2, 8
    x = torch.randn(B, T, 64)
    cos, sin = precompute_rope(hd, T, 10000.0)
    out = attn(x, cos, sin)

    q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, KV, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, KV, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (B, H, T, hd)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    ref = attn.o_proj((att @ v).transpose(1, 2).reshape(B, T, 64))
    torch.testing.assert_close(out, ref)


def test_apply_rope_matches_complex_reference():
    hd, T, base = 16, 12, 500.0
    x = torch.randn(2, 3, T, hd, dtype=torch.float64)
    cos, sin = precompute_rope(hd, T, base)
    got = apply_rope(x, cos.double(), sin.double())
    # rotate-half layout: dims i and i + hd/2 form the complex number rotated by pos * freq_i
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :])
    inv_freq = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, hd/2)
    z = z * torch.polar(torch.ones_like(theta), theta)
    torch.testing.assert_close(got, torch.cat((z.real, z.imag), dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_depends_only_on_relative_position():
    hd = 16
    cos, sin = precompute_rope(hd, 64, 10000.0)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, hd), cos[m].double(), sin[m].double())
        kn = apply_rope(k.view(1, 1, 1, hd), cos[n].double(), sin[n].double())
        return (qm * kn).sum()

    for shift in (1, 7, 30):
        torch.testing.assert_close(score(5, 2), score(5 + shift, 2 + shift), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_positions_and_mask_equal_separate_documents():
    m = tiny()
    lengths = [5, 7, 4]
    docs = [tokens(B=1, T=n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)  # (1, 16)
    doc_id = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]  # (1, T)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)
    mask = (doc_id[:, :, None] == doc_id[:, None, :]).unsqueeze(1)  # (1, 1, T, T) block diagonal
    got = m(packed, positions=positions, attn_mask=mask)
    ref = torch.cat([m(d) for d in docs], dim=1)
    torch.testing.assert_close(got, ref)
    # without the mask the later documents see the earlier ones
    assert not torch.allclose(m(packed, positions=positions), ref)


def test_attn_mask_must_be_bool():
    m = tiny()
    with pytest.raises(TypeError, match="bool"):
        m(tokens(T=4), attn_mask=torch.zeros(1, 1, 4, 4))


def test_set_rope_changes_and_restores():
    m = tiny()
    idx = tokens()
    before = m(idx)
    m.set_rope(base=500.0)
    changed = m(idx)
    assert m.rope_base == 500.0 and not torch.allclose(before, changed)
    # passing the frequencies directly is the same as passing the base they come from
    m.set_rope(inv_freq=rope_inv_freq(8, 500.0))
    torch.testing.assert_close(m(idx), changed, rtol=0, atol=0)
    m.set_rope(base=10000.0)
    torch.testing.assert_close(m(idx), before, rtol=0, atol=0)
    # attention_scale multiplies the tables; max_seq_len grows the cache
    m.set_rope(attention_scale=1.5, max_seq_len=64)
    assert m.rope_cos.shape == (64, 8) and m.max_seq_len == 64
    torch.testing.assert_close(m.rope_cos[:32], 1.5 * precompute_rope(8, 32, 10000.0)[0])
    assert m(tokens(T=48)).shape == (2, 48, 100)
    with pytest.raises(ConfigError, match="inv_freq"):
        m.set_rope(inv_freq=torch.ones(3))


def test_rope_buffers_not_in_state_dict():
    m = tiny()
    params = {n for n, _ in m.named_parameters(remove_duplicate=False)}
    assert set(m.state_dict()) == params
    assert {"inv_freq", "rope_cos", "rope_sin"} <= {n for n, _ in m.named_buffers()}


# ----------------------------------------------------------------------------- sizes and config


def test_tied_embeddings_share_storage():
    m = tiny()
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()
    u = tiny(tie_embeddings=False)
    assert u.lm_head.weight.data_ptr() != u.tok_emb.weight.data_ptr()


def test_num_params_hand_count():
    # per layer: q 32*32 + k,v 2*32*16 + o 32*32 + mlp 3*32*64 + 2 norms * 32
    per_layer = 1024 + 1024 + 1024 + 6144 + 64
    blocks = 2 * per_layer + 32  # + final norm
    emb = 100 * 32
    assert tiny().num_params() == blocks
    assert tiny().num_params(non_embedding=False) == blocks + emb
    assert tiny(tie_embeddings=False).num_params() == blocks + emb
    assert tiny(tie_embeddings=False).num_params(non_embedding=False) == blocks + 2 * emb


def test_init_scales():
    m = DecoderLM(ModelConfig(vocab_size=512, dim=128, n_layers=8, n_heads=4, max_seq_len=16))
    assert m.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.layers[0].mlp.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.all(m.norm.weight == 1)


def test_default_hidden():
    assert ModelConfig(dim=256).hidden == 704  # int(8 * 256 / 3) = 682, rounded up to 64s
    assert ModelConfig(dim=256, ffn_hidden=100).hidden == 100
    assert ModelConfig(n_heads=4).kv_heads == 4 and ModelConfig().head_dim == 64


def test_too_long_sequence_raises():
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len 32"):
        tiny()(tokens(T=33))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(dim=30, n_heads=4), "n_heads"),
        (dict(dim=12, n_heads=4), "head dim"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_layers=0), "n_layers"),
        (dict(rope_base=1.0), "rope_base"),
        (dict(dims=64), "dims"),
    ],
)
def test_invalid_config_names_the_field(kw, field):
    with pytest.raises(ValidationError, match=field):
        ModelConfig(**kw)


def test_flops_per_token_hand_count():
    cfg = ModelConfig(**TINY)
    n = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64) + 32 * 100  # block matmuls + head
    assert (
        flops_per_token(cfg, 16) == 6 * n + 12 * 2 * 32 * (16 + 1) / 2
    )  # causal: the half square, 17/2 keys per query
    # matmul parameters are the non-embedding ones minus norms, plus the (tied) head
    m = tiny()
    norms = sum(p.numel() for name, p in m.named_parameters() if "norm" in name)
    assert n == m.num_params() - norms + 32 * 100


# ----------------------------------------------------------------------------- Hugging Face parity


@pytest.mark.parametrize("tie", [True, False])
def test_parity_with_hf_llama(tie):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(
        vocab_size=128,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        rope_base=5000.0,
        norm_eps=1e-5,
        tie_embeddings=tie,
    )
    torch.manual_seed(0)
    m = DecoderLM(cfg).eval()
    with torch.no_grad():  # norm weights are ones at init: make them count
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=cfg.hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = to_hf_state(m)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(ours[name])
    assert {n for n, _ in hf.named_parameters()} <= set(ours)
    idx = tokens(B=2, T=40, vocab=128)
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits)
        pos = torch.arange(40).expand(2, 40) + torch.tensor([[3], [11]])  # shifted positions
        torch.testing.assert_close(m(idx, positions=pos), hf(idx, position_ids=pos).logits)
