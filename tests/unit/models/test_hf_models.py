"""Hugging Face causal LMs trained through rampup's engine: Llama, Qwen2, Mistral, GPT-NeoX, GPT-2.

Tiny random models are built from configs (no network); the corpus and tokenizer are rampup's own."""

import shutil
from pathlib import Path

import pytest
import torch

from conftest import bpe_tokenizer, tiny_tree
from rampup.config import RunConfig
from rampup.errors import ConfigError
from rampup.models.adapter import Batch

transformers = pytest.importorskip("transformers")
from rampup.models.hf import HFCausalLMAdapter  # noqa: E402

SMALL = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}
FAMILIES = {
    "llama": {"model_type": "llama", "num_key_value_heads": 2, **SMALL},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2, **SMALL},
    "gpt_neox": {"model_type": "gpt_neox", "rotary_pct": 0.25, **SMALL},  # rotates a quarter of each head
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 512,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "bos_token_id": None,
        "eos_token_id": None,
    },
}
ROPE_STAGE = {"rope": {"method": "yarn", "factor": 4, "original_max_len": 64}}


def builder(config):
    def build(cfg, device):
        return HFCausalLMAdapter.from_config(config, device)

    return build


def run(data_cache, out, family, *, last=None, resume=False):
    from rampup.engine.trainer import train

    tree = tiny_tree(
        data_cache, out, train={"duration": "16 steps", "checkpoint_every": "8 steps"}, log={"progress": "off"}
    )
    tree["schedule"]["stages"][1] |= last if last is not None else ({} if family == "gpt2" else ROPE_STAGE)
    return train(RunConfig.model_validate(tree), resume=resume, build_model=builder(FAMILIES[family]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_through_the_engine_and_resumes_bitwise(data_cache, tmp_path, family):
    full = run(data_cache, tmp_path / "full", family)
    assert full["steps"] == 16 and full["val_loss"]["256"] < 5.9  # learned: uniform over 512 tokens is 6.24
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000016")
    resumed = run(data_cache, tmp_path / "resumed", family, resume=True)
    assert resumed["val_loss"] == full["val_loss"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "resumed" / "checkpoints" / "step_0000016" / name).read_bytes() == (
            tmp_path / "full" / "checkpoints" / "step_0000016" / name
        ).read_bytes()


def test_a_rope_method_on_gpt2_is_refused_before_compute(data_cache, tmp_path):
    with pytest.raises(ConfigError, match="knob 'rope', which this model"):
        run(data_cache, tmp_path / "gpt2", "gpt2", last=ROPE_STAGE)
    assert not (tmp_path / "gpt2").exists()


def test_rope_through_llamas_own_rotary_embedding_equals_the_reference_model():
    from rampup.models import DecoderLM, ModelConfig
    from rampup.models.adapter import DecoderLMAdapter
    from rampup.models.rope import RopeSpec

    torch.manual_seed(0)
    hf = HFCausalLMAdapter.from_config(FAMILIES["llama"] | {"tie_word_embeddings": False, "rms_norm_eps": 1e-5})
    ref = DecoderLMAdapter(
        DecoderLM(
            ModelConfig(
                vocab_size=512,
                dim=64,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                ffn_hidden=128,
                max_seq_len=256,
                tie_embeddings=False,
            )
        )
    )
    ref.from_hf_state_dict(hf.to_hf_state_dict())
    x = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(1))
    for spec in (
        RopeSpec(method="yarn", factor=4, original_max_len=64),
        RopeSpec(method="pi", factor=2),
        RopeSpec(base=500000.0),
    ):
        hf.set_rope(spec, 200)
        ref.set_rope(spec, 200)
        b = Batch(x, x, {})
        with torch.no_grad():
            ours, theirs = ref.forward(b), hf.forward(b)
            torch.testing.assert_close(theirs.head(theirs.hidden), ours.head(ours.hidden), atol=2e-5, rtol=1e-4)


def test_gpt_neox_rescales_only_its_rotary_dimensions():
    from rampup.models.rope import RopeSpec, rope_frequencies

    a = HFCausalLMAdapter.from_config(FAMILIES["gpt_neox"])
    rot = a._rotary
    assert rot.inv_freq.numel() == 2  # head_dim 16 x 0.25 = 4 rotary dims
    before = rot.inv_freq.clone()
    a.set_rope(RopeSpec(method="pi", factor=2))
    torch.testing.assert_close(rot.inv_freq, before / 2)
    assert torch.equal(rot.inv_freq, rope_frequencies(RopeSpec(method="pi", factor=2), 4, 10000.0)[0])


def test_mistral_windows_through_its_own_sliding_window():
    from rampup.models.attention import AttentionSpec

    torch.manual_seed(0)
    a = HFCausalLMAdapter.from_config({"model_type": "mistral", "num_key_value_heads": 2, **SMALL})
    torch.manual_seed(0)
    native = transformers.MistralForCausalLM(
        transformers.MistralConfig(num_key_value_heads=2, sliding_window=16, **SMALL)
    ).eval()
    native.load_state_dict(a.module.state_dict())
    a.module.eval()
    x = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = native(x).logits
        a.set_attention(AttentionSpec(kind="window"), 16)
        out = a.forward(Batch(x, x, {}))
        torch.testing.assert_close(out.head(out.hidden), full)
        from rampup.engine.tasks import CausalLM

        one_doc = CausalLM(-1, doc_mask=True).make_batch(x, x)  # no end-of-text: one document per row
        out = a.forward(one_doc)  # a given mask bypasses Mistral's own: the window is folded into it
        torch.testing.assert_close(out.head(out.hidden), full)
        a.set_attention(AttentionSpec(), 0)
        out = a.forward(Batch(x, x, {}))
        assert not torch.allclose(out.head(out.hidden), full)
    with pytest.raises(ConfigError, match="one sliding window for every layer"):
        a.check_knob("attention", AttentionSpec(kind="sinks"))
    with pytest.raises(ConfigError, match="position limit"):
        a.check_knob("seq_len", 512)


def test_model_folders_load_safetensors_only_and_name_what_is_wrong(tmp_path):
    a = HFCausalLMAdapter.from_config(FAMILIES["llama"])
    a.module.save_pretrained(tmp_path / "ok", safe_serialization=True)
    b = HFCausalLMAdapter.from_pretrained(tmp_path / "ok")
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(b.module(x).logits, a.module.eval()(x).logits)
    assert next(b.module.parameters()).dtype == torch.float32
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "ok" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(a.module.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickled .bin weights.*safe_serialization=True"):
        HFCausalLMAdapter.from_pretrained(tmp_path / "bin")
    with pytest.raises(ConfigError, match="no config.json"):
        HFCausalLMAdapter.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="'opt' is not supported.*llama, qwen2, mistral, gpt_neox, gpt2"):
        HFCausalLMAdapter.from_config({"model_type": "opt", "vocab_size": 512, "hidden_size": 64})


# ----------------------------------------------------------------------------- shipped configs, model.source: hf
SHIPPED = sorted((Path(__file__).parents[3] / "configs" / "hf").glob("*.yaml"))


def overrides(path, data_cache, out):
    """--set values that shrink a shipped HF config to a few steps on the tests' small corpus."""
    small = [
        f"data.cache_dir={data_cache}",
        "data.max_files=40",
        f"train.out_dir={out}",
        "train.duration=8 steps",
        "train.checkpoint_every=2 steps",
        "eval.max_tokens=2048",
        "eval.every=null",
        "log.progress=plain",
        "schedule.knobs.batch_tokens=2048",
        "train.threads=1",
    ]
    if "buckets" in path.name:
        return small + [
            "data.buckets.max_log2=8",
            "schedule.knobs.seq_len=256",
            "data.buckets.repeat=true",
            "eval.seq_lens=[256]",
        ]
    return small + ["schedule.stages.0.seq_len=64", "schedule.stages.1.seq_len=256", "eval.seq_lens=[256]"]


def shipped(path, data_cache, out):
    from rampup.config import load_config

    return load_config(path, overrides(path, data_cache, out))


def test_an_hf_run_exports_with_its_last_stages_rope(data_cache, tmp_path):
    from rampup.engine.checkpoint.format import latest_checkpoint, load_checkpoint
    from rampup.engine.trainer import train
    from rampup.models.build import build_adapter
    from rampup.schedule.registry import KnobContext, KnobRunner
    from rampup.schedule.stages import Schedule
    from rampup.tools.export import export_hf

    cfg = shipped(SHIPPED[[p.stem for p in SHIPPED].index("gpt_neox_staged")], data_cache, tmp_path / "run")
    train(cfg)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == 4
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.25
    ours = build_adapter(cfg.model)
    load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"), ours.module, None)
    s = Schedule.build(cfg.schedule, total=cfg.train.duration)
    KnobRunner(KnobContext(ours)).apply(s.at(s.total_tokens - 1), 256)
    ours.module.eval()
    x = torch.randint(0, 2048, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        o = ours.forward(Batch(x, x, {}))
        torch.testing.assert_close(hf(x).logits, o.head(o.hidden))


def test_bad_hf_model_settings_are_config_errors(tmp_path):
    from rampup.config import load_config

    with pytest.raises(ConfigError, match="exactly one of model.path"):
        load_config(None, ["model.source=hf"])
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(None, ["model.source=hf", f"model.path={tmp_path}"])
    with pytest.raises(ConfigError, match="'bert' is not supported"):
        load_config(None, ["model.source=hf", "model.hf_config={model_type: bert}"])
    with pytest.raises(ConfigError, match="for model.source: hf"):
        load_config(None, [f"model.path={tmp_path}"])
    from rampup.models.build import build_adapter

    cfg = load_config(None, ["model.source=hf", "model.hf_config={model_type: llama, rms_norm_eps: 1e-5}"])
    with pytest.raises(ConfigError, match="not a valid llama config.*write 1.0e-5"):
        build_adapter(cfg.model, "meta")  # what rampup plan and train do first
    with pytest.raises(ConfigError, match="seq_len reaches 256 but this Hugging Face model takes 128 positions"):
        load_config(
            None,
            [
                "model.source=hf",
                "model.hf_config={model_type: llama, max_position_embeddings: 128}",
                "schedule.knobs.seq_len=256",
                "schedule.knobs.batch_tokens=1024",
            ],
        )


def model_folder(folder, *, with_tokenizer=True):
    """A local Hugging Face model folder, as `save_pretrained` writes it: a tiny Llama and a real BPE
    tokenizer (trained here on the standard library's own source) whose end-of-text token is </s>."""
    tok = bpe_tokenizer(["<s>", "</s>"])
    a = HFCausalLMAdapter.from_config(
        FAMILIES["llama"] | {"vocab_size": tok.get_vocab_size(), "eos_token_id": 1, "bos_token_id": 0}
    )
    a.module.save_pretrained(folder, safe_serialization=True)
    if with_tokenizer:
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>").save_pretrained(
            folder
        )
    return tok


def test_continued_pretraining_uses_the_models_own_tokenizer_and_eos(data_cache, tmp_path):
    from rampup.config import load_config
    from rampup.data.dataset import TokenDataset
    from rampup.data.prepare import get_prepared
    from rampup.engine.trainer import train

    tok = model_folder(tmp_path / "model")
    cfg = load_config(
        None,
        [
            "model.source=hf",
            f"model.path={tmp_path / 'model'}",
            "data.max_files=40",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.duration=6 steps",
            "train.checkpoint_every=null",
            "log.progress=off",
            "schedule.knobs.seq_len=128",
            "schedule.knobs.batch_tokens=1024",
            "eval.max_tokens=1024",
        ],
    )
    assert cfg.data.tokenizer.path == str(tmp_path / "model" / "tokenizer.json") and cfg.data.tokenizer.eot == "</s>"
    summary = train(cfg)
    ds = TokenDataset.open(get_prepared(cfg.data), "train")
    assert ds.eot_id == tok.token_to_id("</s>") == 1 and ds.vocab_size == tok.get_vocab_size()
    assert all(int(ds.doc(i)[-1]) == 1 for i in range(ds.n_docs))  # every document ends with the model's eos
    assert summary["steps"] == 6
    out = __import__("rampup.tools.export", fromlist=["export_hf"]).export_hf(tmp_path / "run", tmp_path / "hf")
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "</s>"


def test_an_hf_folder_trains_past_its_positions_where_a_stage_rope_covers_them(tmp_path):
    """A 256-position Llama folder, 70% at 128 then 512: refused without a rope that covers 512 (the
    error names one), accepted with YaRN x2 from 256 (model.max_seq_len becomes 512, and the model
    declares it), or with model.max_seq_len set (any rope method, plain RoPE included)."""
    from rampup.config import load_config
    from rampup.models.build import build_adapter

    model_folder(tmp_path / "model")
    base = [
        "model.source=hf",
        f"model.path={tmp_path / 'model'}",
        "schedule.knobs.batch_tokens=2048",
        "schedule.stages=[{name: short, duration: 70%, seq_len: 128}, {name: long, seq_len: 512}]",
    ]
    with pytest.raises(
        ConfigError,
        match=r"schedule.stages.1.seq_len reaches 512 but this Hugging Face model takes "
        r"256 positions \(max_position_embeddings of .*model\); give the stage a rope that covers it, "
        r"e.g. rope: \{method: yarn, factor: 2, original_max_len: 256\}",
    ):
        load_config(None, base)
    yarn = "schedule.stages.1.rope={method: yarn, factor: 2, original_max_len: 256}"
    cfg = load_config(None, [*base, yarn, "eval.seq_lens=[128, 512]"])
    assert cfg.model.max_seq_len == 512
    assert build_adapter(cfg.model, "meta").module.config.max_position_embeddings == 512
    # a rope set earlier holds in later stages; one whose factor x original falls short does not cover
    assert load_config(None, [*base, yarn.replace("stages.1", "knobs")]).model.max_seq_len == 512
    with pytest.raises(ConfigError, match="reaches 512"):
        load_config(None, [*base, "schedule.stages.1.rope={method: pi, factor: 1.5}"])
    # model.max_seq_len set by the user overrides the folder's limit for every method
    assert load_config(None, [*base, "model.max_seq_len=512"]).model.max_seq_len == 512
    with pytest.raises(
        ConfigError, match=r"reaches 512 but this Hugging Face model takes 384 positions \(model.max_seq_len\)"
    ):
        load_config(None, [*base, "model.max_seq_len=384", yarn])
    # learned positions cannot grow
    with pytest.raises(ConfigError, match="GPT-2 learns one embedding per position"):
        load_config(
            None, ["model.source=hf", "model.max_seq_len=512", "model.hf_config={model_type: gpt2, n_positions: 256}"]
        )


def test_a_model_folder_without_a_fast_tokenizer_is_named(tmp_path):
    from rampup.config import load_config

    model_folder(tmp_path / "model", with_tokenizer=False)
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        load_config(None, ["model.source=hf", f"model.path={tmp_path / 'model'}"])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_document_masking_equals_each_document_alone(family):
    from rampup.data.packing import document_positions, segment_ids
    from rampup.engine.tasks import CausalLM

    a = HFCausalLMAdapter.from_config(FAMILIES[family])
    a.module.eval()
    x = torch.randint(1, 512, (2, 30), generator=torch.Generator().manual_seed(3))
    x[0, 9] = x[1, 19] = 0  # token 0 ends a document
    b = CausalLM(0, doc_mask=True, restart_positions=True).make_batch(x, x)
    assert torch.equal(b.extra["positions"], document_positions(segment_ids(x, 0)))
    with torch.no_grad():
        packed = a.forward(b).hidden
        for row, cut in ((0, 10), (1, 20)):
            alone = torch.cat(
                [
                    a.forward(Batch(x[row : row + 1, :cut], x, {})).hidden,
                    a.forward(Batch(x[row : row + 1, cut:], x, {})).hidden,
                ],
                dim=1,
            )
            torch.testing.assert_close(packed[row : row + 1], alone)


def test_an_hf_model_trains_with_document_masking(data_cache, tmp_path):
    from rampup.engine.trainer import train

    tree = tiny_tree(
        data_cache,
        tmp_path / "run",
        train={"duration": "6 steps", "checkpoint_every": None},
        log={"progress": "off"},
        data={"doc_mask": True, "restart_positions": True},
    )
    summary = train(RunConfig.model_validate(tree), build_model=builder(FAMILIES["llama"]))
    assert summary["steps"] == 6 and summary["val_loss"]["256"] < 6.2


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", [p for p in SHIPPED if p.stem in ("llama_buckets", "gpt_neox_staged")], ids=lambda p: p.stem
)
def test_shipped_hf_configs_killed_mid_run_resume_bitwise(data_cache, tmp_path, path):
    """Real processes: `rampup train configs/hf/X.yaml` (shrunk by --set) SIGKILLed mid-step after its
    step-4 checkpoint (the staged configs' RoPE change still ahead), then resumed with --resume. Two
    shipped configs: the bucket sampler on Llama, and a RoPE change on GPT-NeoX's partial rotary; every
    family's bitwise resume is tested in process above, every shipped config is planned in test_config."""
    import os
    import subprocess

    from conftest import (
        alongside,
        rampup_cmd,
        run_rampup,
        step_losses,
        wait_for,
        weights,
    )

    def sets(out):
        return [a for s in overrides(path, data_cache, out) for a in ("--set", s)]

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONHASHSEED": "0", "RAMPUP_FAULT_STALL_STEPS": "5:60"}
    with alongside("train", str(path), *sets(tmp_path / "ref")):
        proc = subprocess.Popen(
            rampup_cmd("train", str(path), *sets(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        wait_for(lambda: (out / "checkpoints" / "step_0000004").is_dir(), proc)
        proc.kill()
        proc.wait()
    res = run_rampup("train", str(out / "config.yaml"), "--resume")
    assert res.returncode == 0, res.stderr
    assert step_losses(out) == step_losses(tmp_path / "ref")  # bitwise: floats compared exactly
    assert weights(out) == weights(tmp_path / "ref")


def test_qwen2_windows_and_hybrids_through_its_own_layer_types():
    from rampup.models.attention import AttentionSpec

    torch.manual_seed(0)
    a = HFCausalLMAdapter.from_config(FAMILIES["qwen2"])
    a.module.eval()
    x = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(4))
    for spec, types in (
        (AttentionSpec(kind="window"), ["sliding_attention"] * 2),
        (AttentionSpec(kind="window", full_layers=[1]), ["sliding_attention", "full_attention"]),
    ):
        native = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                num_key_value_heads=2, use_sliding_window=True, sliding_window=16, layer_types=types, **SMALL
            )
        ).eval()
        native.load_state_dict(a.module.state_dict())
        a.set_attention(spec, 16)
        with torch.no_grad():
            out = a.forward(Batch(x, x, {}))
            torch.testing.assert_close(out.head(out.hidden), native(x).logits)
    a.set_attention(AttentionSpec(), 0)  # back to full causal attention
    plain = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **SMALL)).eval()
    plain.load_state_dict(a.module.state_dict())
    with torch.no_grad():
        out = a.forward(Batch(x, x, {}))
        torch.testing.assert_close(out.head(out.hidden), plain(x).logits)
    a.check_knob("attention", AttentionSpec(kind="window", full_layers=[1]))  # a hybrid is fine on Qwen2
    with pytest.raises(ConfigError, match="cannot be expressed"):
        a.check_knob("attention", AttentionSpec(kind="sinks"))


def test_bf16_weights_become_fp32_master_weights_unless_asked_to_stay(data_cache, tmp_path):
    from rampup.config import load_config
    from rampup.engine.trainer import train
    from rampup.models.build import build_adapter

    model_folder(tmp_path / "model")
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    m.save_pretrained(tmp_path / "bf16", safe_serialization=True)  # a folder that stores bf16 weights
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / f).write_bytes((tmp_path / "model" / f).read_bytes())
    base = [
        "model.source=hf",
        f"model.path={tmp_path / 'bf16'}",
        "data.max_files=40",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.duration=2 steps",
        "train.checkpoint_every=null",
        "log.progress=off",
        "schedule.knobs.seq_len=128",
        "schedule.knobs.batch_tokens=1024",
        "eval.max_tokens=512",
    ]
    cfg = load_config(None, base + [f"train.out_dir={tmp_path / 'a'}"])
    assert {p.dtype for p in build_adapter(cfg.model).module.parameters()} == {torch.float32}
    kept = load_config(None, base + [f"train.out_dir={tmp_path / 'b'}", "model.weights_dtype=bfloat16"])
    adapter = build_adapter(kept.model)
    assert {p.dtype for p in adapter.module.parameters()} == {torch.bfloat16}
    assert train(kept)["steps"] == 2
    with pytest.raises(ConfigError, match="weights_dtype is for model.source: hf"):
        load_config(None, ["model.weights_dtype=bfloat16"])
