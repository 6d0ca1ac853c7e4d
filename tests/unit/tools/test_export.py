"""rampup export --format hf: what transformers' from_pretrained loads, equal to rampup's model."""

import json

import pytest
import torch

from conftest import flip_bit, run_rampup, tiny_tree
from rampup.config import RunConfig

transformers = pytest.importorskip("transformers")

LAST_STAGE = {
    "llama": ({}, "LlamaForCausalLM"),
    "llama_yarn": ({"rope": {"method": "yarn", "factor": 4, "original_max_len": 64}}, "LlamaForCausalLM"),
    "mistral": ({"attention": {"kind": "window"}, "window": 32}, "MistralForCausalLM"),
}


def trained(data_cache, tmp_path, last):
    from rampup.engine.trainer import train

    tree = tiny_tree(
        data_cache, tmp_path / "run", train={"duration": "8 steps", "checkpoint_every": None}, log={"progress": "off"}
    )
    tree["schedule"]["stages"][1] |= last
    cfg = RunConfig.model_validate(tree)
    train(cfg)
    return cfg, tmp_path / "run"


def ours(cfg, run):
    from rampup.engine.checkpoint.format import latest_checkpoint, load_checkpoint
    from rampup.models.adapter import DecoderLMAdapter
    from rampup.schedule.registry import KnobContext, KnobRunner
    from rampup.schedule.stages import Schedule

    a = DecoderLMAdapter.build(cfg.model)
    load_checkpoint(latest_checkpoint(run / "checkpoints"), a.module, None)
    s = Schedule.build(cfg.schedule, total=cfg.train.duration)
    KnobRunner(KnobContext(a)).apply(s.at(s.total_tokens - 1), cfg.model.max_seq_len)
    return a.module.eval()


@pytest.mark.parametrize("kind", sorted(LAST_STAGE))
def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(data_cache, tmp_path, kind):
    from rampup.tools.export import export_hf

    last, family = LAST_STAGE[kind]
    cfg, run = trained(data_cache, tmp_path, last)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # the default attention backend
    assert type(hf).__name__ == family
    model = ours(cfg, run)
    x = torch.randint(0, cfg.model.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x))
        ids = x[:1, :100]
        for _ in range(20):  # rampup's model, greedy
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        gen = hf.generate(x[:1, :100], max_new_tokens=20, do_sample=False, pad_token_id=hf.config.eos_token_id)
    assert gen[0, 100:].tolist() == ids[0, 100:].tolist()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    from rampup.data.prepare import get_prepared, load_prepared_tokenizer

    ref = load_prepared_tokenizer(get_prepared(cfg.data))
    text = "def f(x):\n    return x + 1  # a comment"
    assert tok(text)["input_ids"] == ref.encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == hf.config.eos_token_id


def test_export_rope_settings_are_the_last_stages(data_cache, tmp_path):
    from rampup.tools.export import export_hf

    cfg, run = trained(data_cache, tmp_path, LAST_STAGE["llama_yarn"][0])
    out = export_hf(run, tmp_path / "hf", dtype="bfloat16")
    c = json.loads((out / "config.json").read_text())
    rope = c.get("rope_parameters") or c.get("rope_scaling")
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4 and rope["original_max_position_embeddings"] == 64
    assert c["max_position_embeddings"] == cfg.model.max_seq_len
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


def test_export_refuses_what_it_cannot_write(data_cache, tmp_path):
    from rampup.errors import ConfigError
    from rampup.tools.export import hf_config

    hybrid = RunConfig.model_validate(tiny_tree(data_cache, tmp_path / "x")).model
    from rampup.models.attention import AttentionSpec
    from rampup.models.rope import RopeSpec

    with pytest.raises(ConfigError, match="mixes full and windowed layers"):
        hf_config(
            hybrid,
            {"attention": AttentionSpec(kind="window", full_layers=[1]), "window": 32, "rope": RopeSpec()},
            eos_token_id=0,
            dtype="float32",
        )
    cfg, run = trained(data_cache, tmp_path, {"attention": {"kind": "sinks", "n_global": 4}, "window": 32})
    res = run_rampup("export", str(run), str(tmp_path / "hf"))
    assert res.returncode == 2 and "no Hugging Face model family expresses" in res.stderr
    assert not (tmp_path / "hf").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    res = run_rampup("export", str(run), str(busy))
    assert res.returncode == 2 and "not an empty folder" in res.stderr
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    ckpt = next((run / "checkpoints").glob("step_*"))
    flip_bit(ckpt / "model.safetensors", 200)
    res = run_rampup("export", str(ckpt), str(tmp_path / "hf2"))
    assert res.returncode == 2 and "sha256" in res.stderr and not (tmp_path / "hf2").exists()
