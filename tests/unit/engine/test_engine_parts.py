"""The engine's parts: model adapter, tasks and batches, optimizer groups, honest FLOPs, the package's
import structure."""

import ast
from pathlib import Path

import pytest
import torch

from rampup.engine.optim import OptimizerConfig, build_optimizer
from rampup.engine.tasks import CausalLM
from rampup.models import ModelConfig
from rampup.models.adapter import Batch, DecoderLMAdapter
from rampup.models.llm import flops_per_token

SRC = Path(__file__).parents[3] / "src" / "rampup"
TINY = dict(vocab_size=100, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)


def adapter(**kw) -> DecoderLMAdapter:
    torch.manual_seed(0)
    return DecoderLMAdapter.build(ModelConfig(**{**TINY, **kw}))


def tokens(B=2, T=16, seed=1):
    return torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the adapter
def test_forward_is_hidden_states_plus_the_head():
    a = adapter()
    b = Batch(tokens(), tokens(seed=2), {})
    out = a.forward(b)
    assert out.hidden.shape == (2, 16, 32)
    torch.testing.assert_close(out.head(out.hidden), a.module(b.inputs), rtol=0, atol=0)
    loss = CausalLM().loss(a, b)
    ref = torch.nn.functional.cross_entropy(a.module(b.inputs).flatten(0, 1), b.targets.flatten())
    torch.testing.assert_close(loss, ref)


def test_hidden_states_at_chosen_layers_are_the_blocks_outputs():
    a = adapter()
    b = Batch(tokens(), tokens(), {})
    got = a.hidden_states(b, [0, 2, 3])
    seen = {}
    hooks = [
        blk.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n, blk in enumerate(a.module.layers)
    ]
    final = a.module.forward_hidden(b.inputs)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got[0], seen[0])
    torch.testing.assert_close(got[2], seen[2])
    torch.testing.assert_close(got[3], final)
    assert set(got) == {0, 2, 3}
    with pytest.raises(Exception, match="do not exist"):
        a.hidden_states(b, [7])


def test_blocks_name_their_parameters_and_can_be_wrapped():
    a = adapter()
    names = [n for n, _ in a.blocks()]
    assert names == ["layers.0", "layers.1", "layers.2"]
    params = {n for n, _ in a.module.named_parameters()}
    for name, block in a.blocks():
        assert all(f"{name}.{p}" in params for p, _ in block.named_parameters())

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, *args):
            return 2 * self.inner(x, *args) - x

    x = tokens()
    before = a.module.forward_hidden(x)
    a.wrap_block(1, Doubled)
    assert isinstance(a.module.layers[1], Doubled)
    assert not torch.allclose(a.module.forward_hidden(x), before)


def test_hf_state_dict_round_trip_and_parity_with_llama():
    transformers = pytest.importorskip("transformers")
    from conftest import to_hf_state

    a = adapter(tie_embeddings=False)
    hf_sd = a.to_hf_state_dict()
    hand = {k: v for k, v in to_hf_state(a.module).items()}
    assert set(hf_sd) == set(hand) and all(torch.equal(hf_sd[k], hand[k]) for k in hand)
    cfg = a.cfg
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_base,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
    ).eval()
    hf.load_state_dict(hf_sd, strict=True)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(a.module.eval()(x), hf(x).logits)
    b = adapter(tie_embeddings=False)
    torch.manual_seed(5)
    b.module.reset_parameters()
    b.from_hf_state_dict({k: v.clone() for k, v in hf.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(b.module.eval()(x), hf(x).logits)


def test_load_builds_the_model_with_saved_weights(tmp_path):
    from safetensors.torch import save_model

    a = adapter()
    save_model(a.module, str(tmp_path / "model.safetensors"))
    b = DecoderLMAdapter.load(a.cfg, str(tmp_path / "model.safetensors"))
    x = tokens()
    torch.testing.assert_close(b.module(x), a.module(x), rtol=0, atol=0)
    with pytest.raises(Exception, match="does not fit this model config"):
        DecoderLMAdapter.load(ModelConfig(**{**TINY, "n_layers": 4}), str(tmp_path / "model.safetensors"))


def test_supports_names_the_knobs_it_honours():
    from rampup.knobs.generation import GENERATION_KNOBS
    from rampup.knobs.image import IMAGE_KNOBS
    from rampup.schedule.registry import KNOBS

    a = adapter()
    # temperature: tests/unit/engine/test_seams.py's own knob; the image family's knobs: an image task's;
    # the generation family's: a generating host loop's (TRL), never the engine's
    foreign = (*IMAGE_KNOBS, *GENERATION_KNOBS)
    assert all(a.supports(k) for k in KNOBS if k != "temperature" and k not in foreign)
    assert not any(a.supports(k) for k in foreign)
    assert not a.supports("no_such_knob")


# ----------------------------------------------------------------------------- batches and tasks
def test_document_spans_are_built_on_the_host_and_match_segments():
    from rampup.data.packing import segment_ids
    from rampup.models.docmask import DocumentSpans

    a = adapter()
    x = tokens(B=4, T=24)
    x[x == 7] = 8
    x[0, 5] = x[1, 5] = x[2, 11] = 7  # end-of-text token 7 ends documents
    task = CausalLM(7, doc_mask=True)
    b = task.make_batch(x, x)
    assert isinstance(b.extra["spans"], DocumentSpans)  # plain ints: the forward pass reads no device tensor
    torch.testing.assert_close(a.module(x, spans=b.extra["spans"]), a.module(x, segments=segment_ids(x, 7)))
    part = b.slice(1, 3)  # a micro-batch keeps its rows' documents
    torch.testing.assert_close(
        a.module(x[1:3], spans=part.extra["spans"]), a.module(x[1:3], segments=segment_ids(x[1:3], 7))
    )
    assert task.doc_lengths(b) == [[6, 18], [6, 18], [12, 12], [24]]
    assert "spans" not in task.make_batch(x, x, training=False).extra  # evaluation: whole windows


# ----------------------------------------------------------------------------- optimizer groups
def test_every_parameter_is_in_a_named_group_whose_lr_mult_the_step_applies():
    from rampup.engine.trainer import optimizer_step

    a = adapter()
    a.module.layers[0].attn.q_proj.weight.requires_grad_(False)  # frozen now, still in the optimizer
    opt = build_optimizer(a.module, OptimizerConfig(lr=1e-2, weight_decay=0.0))
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(a.module.parameters()))
    opt.param_groups[1]["lr_mult"] = 0.0  # norms: no update at all
    before = {n: p.detach().clone() for n, p in a.module.named_parameters()}
    x = tokens()
    optimizer_step(a, CausalLM(), opt, Batch(x, tokens(seed=3), {}), lr=1e-2, precision="fp32")
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[1]["lr"] == 0.0
    for n, p in a.module.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (p.dim() >= 2 and n != "layers.0.attn.q_proj.weight"), n


# ----------------------------------------------------------------------------- honest FLOPs
@pytest.mark.parametrize("T", [16, 48])
def test_flops_match_torch_flop_counter(T):
    """Matmul FLOPs forward + backward are 6N per token. torch's counter does not see the CPU flash
    kernel, so attention runs as SDPA's math backend (batched matmuls over the full T x T square); a
    causal kernel computes (T + 1) / (2T) of that square, which is what flops_per_token counts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    a = adapter(tie_embeddings=False)
    cfg = a.cfg
    x = tokens(B=2, T=T)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        loss = a.module(x).float().logsumexp(-1).mean()
        loss.backward()
    counts = fc.get_flop_counts()["Global"]
    sdpa = sum(v for k, v in counts.items() if "bmm" in str(k))  # QK^T and AV, forward and backward
    matmul = sum(v for k, v in counts.items() if "bmm" not in str(k))
    tokens_ = 2 * T
    dense = flops_per_token(cfg, 0)
    assert matmul == pytest.approx(dense * tokens_, rel=1e-9)
    assert sdpa == pytest.approx(12 * cfg.n_layers * cfg.dim * T * tokens_, rel=1e-9)  # the full square
    attention = (flops_per_token(cfg, T) - dense) * tokens_
    assert attention == pytest.approx(sdpa * (T + 1) / (2 * T), rel=1e-9)


def test_flops_count_windows_and_documents():
    from rampup.models.attention import (
        AttentionSpec,
        Pattern,
        layer_patterns,
        pattern_mask,
    )

    cfg = ModelConfig(**TINY)
    dense = flops_per_token(cfg, 0)
    T, w = 64, 8
    pats = layer_patterns(AttentionSpec(kind="window", full_layers=[2]), w, cfg.n_layers)
    keys = [int(pattern_mask(T, p).sum()) if p else T * (T + 1) // 2 for p in pats]
    assert flops_per_token(cfg, T, patterns=pats) == pytest.approx(dense + 12 * cfg.dim * sum(keys) / T)
    sinks = Pattern(w, 4)
    assert flops_per_token(cfg, T, patterns=[sinks] * 3) == pytest.approx(
        dense + 12 * cfg.dim * 3 * int(pattern_mask(T, sinks).sum()) / T
    )
    docs = [[10, 54], [64]]
    pairs = 3 * sum(L * (L + 1) // 2 for r in docs for L in r)
    assert flops_per_token(cfg, T, doc_lengths=docs) == pytest.approx(dense + 12 * cfg.dim * pairs / 128)


# ----------------------------------------------------------------------------- structure
def _imports(path: Path) -> set[str]:
    """rampup modules a file imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rampup"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rampup")}
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_the_model_knows_nothing_of_data_or_training():
    for path in (SRC / "models").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("rampup.data", "rampup.engine")) or m == "rampup.config"}
        assert not bad, (path.name, bad)


def test_the_package_ships_py_typed():
    import importlib.resources

    assert (importlib.resources.files("rampup") / "py.typed").is_file()
