"""Memory techniques: tiled loss, tiled MLP, activation checkpointing, per-stage knobs, estimates, probe.

Gradients are compared with the plain computation on real models (the reference model and a Hugging
Face Llama); memory estimates against measured peak RSS of real steps in child processes; the probe
runs real children held to a real RLIMIT_DATA."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_rampup, step_losses, tiny_tree, write_config
from rampup.config import RunConfig
from rampup.engine.precision import autocast
from rampup.engine.tasks import CausalLM
from rampup.errors import ConfigError
from rampup.knobs.memory import MemorySettings, apply_memory, estimate_step, parse_bytes
from rampup.models.adapter import Batch, DecoderLMAdapter
from rampup.models.llm import ModelConfig
from rampup.models.tiling import tiled_head_loss

CPU = torch.device("cpu")
SETTINGS = [
    MemorySettings(loss_shards=4),
    MemorySettings(mlp_shards=4),
    MemorySettings(activation_checkpoint="full"),
    MemorySettings(activation_checkpoint="selective"),
    MemorySettings(activation_checkpoint="every:2"),
    MemorySettings(activation_checkpoint="full:1-2"),
    MemorySettings(8, 8, "full"),
]


def _grads(adapter, settings, x, y, precision, extra=None):
    a = copy.deepcopy(adapter)
    apply_memory(a, settings)
    with autocast(CPU, precision):
        loss = CausalLM().loss(a, Batch(x, y, extra or {}))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in a.module.named_parameters()}


def _tol(precision, ref=None):
    """fp32: summation order only; bf16: a bf16-rounded output (a weight gradient out of a bf16 matmul,
    summed over shards) differs by up to two bf16 roundings of the tensor's largest value."""
    if precision == "fp32":
        return {"rtol": 1e-5, "atol": 1e-6}
    scale = float(ref.abs().max()) if ref is not None else 1.0
    return {"rtol": 2e-2, "atol": max(2e-3, 2**-7 * scale)}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return DecoderLMAdapter.build(ModelConfig(vocab_size=512, dim=64, n_layers=3, n_heads=4, max_seq_len=128))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.describe())
def test_each_technique_gives_the_plain_gradients(reference, settings, precision):
    x, y = torch.randint(0, 512, (2, 64)), torch.randint(0, 512, (2, 64))
    loss0, g0 = _grads(reference, MemorySettings(), x, y, precision)
    loss, g = _grads(reference, settings, x, y, precision)
    torch.testing.assert_close(loss, loss0, **_tol(precision))
    assert g.keys() == g0.keys()
    for name in g0:  # the tied embedding/head weight included
        torch.testing.assert_close(g[name], g0[name], **_tol(precision, g0[name]), msg=name)
    if settings.loss_shards == 1 and settings.mlp_shards == 1 and precision == "fp32":
        assert all(torch.equal(g[n], g0[n]) for n in g0)  # checkpointing recomputes the very same numbers


def test_the_techniques_leave_parameter_names_and_state_dicts_alone(reference):
    a = copy.deepcopy(reference)
    keys = list(a.module.state_dict())
    apply_memory(a, MemorySettings(4, 4, "selective"))
    assert list(a.module.state_dict()) == keys
    apply_memory(a, MemorySettings())  # off again: the class forwards
    assert all("forward" not in m.__dict__ for m in a.module.modules())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiled_loss_with_a_distillation_term_gives_the_plain_gradients(reference, precision):
    """Any per-shard loss tiles: cross-entropy plus a KL to teacher logits at temperature 2."""
    x, y = torch.randint(0, 512, (2, 64)), torch.randint(0, 512, (2, 64))
    teacher = torch.randn(2, 64, 512)
    tau = 2.0

    def shard_loss(logits, sl):
        ce = F.cross_entropy(logits.float().flatten(0, 1), y[:, sl].flatten(), reduction="sum")
        kl = F.kl_div(
            F.log_softmax(logits.float() / tau, -1),
            F.log_softmax(teacher[:, sl] / tau, -1),
            log_target=True,
            reduction="sum",
        )
        return ce + 0.5 * tau**2 * kl

    out = []
    for shards in (1, 8):
        a = copy.deepcopy(reference)
        with autocast(CPU, precision):
            h = a.module.forward_hidden(x)
            loss = shard_loss(a.head(h), slice(None)) if shards == 1 else tiled_head_loss(h, a.head, shard_loss, 8)
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in a.module.named_parameters()}))
    (l1, g1), (l8, g8) = out
    torch.testing.assert_close(l8, l1, **_tol(precision))
    for n in g1:
        torch.testing.assert_close(g8[n], g1[n], **_tol(precision, g1[n]), msg=n)


def test_evaluation_takes_lengths_the_shards_do_not_divide(reference):
    a = copy.deepcopy(reference)
    x = torch.randint(0, 512, (1, 50))
    with torch.no_grad():
        plain = CausalLM().loss(a, Batch(x, x, {}))
        apply_memory(a, MemorySettings(8, 3, "full"))
        tiled = CausalLM().loss(a, Batch(x, x, {}))
    torch.testing.assert_close(tiled, plain)


def test_a_hugging_face_llama_takes_every_technique():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from rampup.models.hf import HFCausalLMAdapter

    torch.manual_seed(0)
    a = HFCausalLMAdapter.from_config(
        {
            "model_type": "llama",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        }
    )
    a.module.train()
    x, y = torch.randint(0, 512, (2, 64)), torch.randint(0, 512, (2, 64))
    l0, g0 = _grads(a, MemorySettings(), x, y, "fp32")
    for s in (MemorySettings(4, 4, "full"), MemorySettings(activation_checkpoint="selective")):
        loss, g = _grads(a, s, x, y, "fp32")
        torch.testing.assert_close(loss, l0)
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="activation offload is for CUDA")
def test_offloaded_checkpoints_give_the_plain_gradients_on_cuda():
    torch.manual_seed(0)
    a = DecoderLMAdapter.build(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=128), "cuda")
    x, y = torch.randint(0, 512, (2, 64), device="cuda"), torch.randint(0, 512, (2, 64), device="cuda")
    l0, g0 = _grads(a, MemorySettings(), x, y, "fp32")
    loss, g = _grads(a, MemorySettings(activation_checkpoint="full", activation_offload=True), x, y, "fp32")
    torch.testing.assert_close(loss, l0)
    for n in g0:
        torch.testing.assert_close(g[n], g0[n])


# ----------------------------------------------------------------------------- knobs per stage


def test_a_schedule_turns_techniques_on_for_its_long_stage_only(data_cache, tmp_path):
    """Checkpointing recomputes the same numbers: the run with it in its long stage trains bitwise like
    the run without; the techniques are on in that stage only, and are recorded with the stage."""
    from rampup.engine.records import read_metrics
    from rampup.engine.trainer import Trainer

    plain = tiny_tree(
        data_cache,
        tmp_path / "plain",
        train={"duration": "12 steps", "checkpoint_every": None, "threads": 1, "precision": "fp32"},
    )
    staged = copy.deepcopy(plain)
    staged["train"]["out_dir"] = str(tmp_path / "staged")
    staged["schedule"]["stages"][1] |= {"activation_checkpoint": "full", "mlp_shards": 1}
    seen = []
    t = Trainer(RunConfig.model_validate(staged))
    record = t.record_step

    def spy(sp, *a):  # after the step ran with its knobs applied
        seen.append((sp.stage, "forward" in t.state.model.module.layers[0].__dict__))
        return record(sp, *a)

    t.record_step = spy
    t.run()
    Trainer(RunConfig.model_validate(plain)).run()
    assert step_losses(tmp_path / "staged") == step_losses(tmp_path / "plain")
    # the long stage's knobs carry the setting
    stages = [r for r in read_metrics(tmp_path / "staged" / "metrics.jsonl") if r["event"] == "stage"]
    assert stages[1]["knobs"]["activation_checkpoint"] == "full"
    assert stages[0]["knobs"]["activation_checkpoint"] == "none"
    # short stage: the class forward; long stage: the checkpointed one
    assert {stage for stage, on in seen if on} == {1}


def test_tiled_loss_in_a_stage_trains_like_the_plain_run(data_cache, tmp_path):
    from rampup.engine.trainer import train

    tree = tiny_tree(
        data_cache,
        tmp_path / "a",
        train={"duration": "10 steps", "checkpoint_every": None, "threads": 1, "precision": "fp32"},
        log={"progress": "off"},
    )
    tiled = copy.deepcopy(tree)
    tiled["train"]["out_dir"] = str(tmp_path / "b")
    tiled["schedule"]["stages"][1] |= {"loss_shards": 8, "mlp_shards": 4}
    train(RunConfig.model_validate(tree))
    train(RunConfig.model_validate(tiled))
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5)


@pytest.mark.parametrize(
    "knobs, words",
    [
        ({"loss_shards": 3}, ["loss_shards 3 does not divide", "64"]),
        ({"mlp_shards": 0}, ["mlp_shards", ">= 1"]),
        ({"activation_checkpoint": "full:5"}, ["block 5 does not exist", "0-1"]),
        ({"activation_checkpoint": "full:layerz.1"}, ["no block named 'layerz.1'", "layers.1"]),
        ({"activation_checkpoint": "sometimes"}, ["not one of"]),
        ({"activation_offload": True}, ["activation_offload", "CPU"]),
        ({"activation_offload": "auto"}, ["true or false"]),
    ],
)
def test_bad_memory_knobs_are_named_before_compute(data_cache, tmp_path, knobs, words):
    from rampup.engine.trainer import Trainer

    tree = tiny_tree(data_cache, tmp_path / "run", train={"device": "cpu"})
    tree["schedule"]["stages"][0] |= knobs
    with pytest.raises((ConfigError, ValueError)) as e:
        Trainer(RunConfig.model_validate(tree))
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_memory_limits_need_units_and_must_hold_the_model(data_cache, tmp_path):
    from rampup.engine.trainer import Trainer

    with pytest.raises(ValueError, match="no unit"):
        RunConfig.model_validate(tiny_tree(data_cache, tmp_path, train={"memory_limit": 8}))
    with pytest.raises(ValueError, match="not a size"):
        RunConfig.model_validate(tiny_tree(data_cache, tmp_path, train={"memory_limit": "8 potatoes"}))
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("16GB") == 16 * 10**9
    tree = tiny_tree(data_cache, tmp_path / "run", train={"memory_limit": "1MiB"})
    with pytest.raises(ConfigError, match=r"static footprint .*parameters .*gradients .*AdamW state"):
        Trainer(RunConfig.model_validate(tree))


def _bench_cfg(limit=None, **model):
    return RunConfig.model_validate(
        {
            "name": "m",
            "model": {"vocab_size": 8192, "dim": 128, "n_layers": 2, "n_heads": 4, "max_seq_len": 8192, **model},
            "schedule": {"knobs": {"batch_tokens": 4096}, "stages": [{"seq_len": 4096}]},
            "train": {"duration": "1M tok", "precision": "fp32", **({"memory_limit": limit} if limit else {})},
        }
    )


def test_auto_turns_on_what_the_limit_needs_and_refuses_what_nothing_fits():
    from rampup.knobs.memory import check_auto, resolve
    from rampup.schedule.registry import KnobContext

    knobs = {"loss_shards": "auto", "mlp_shards": "auto", "activation_checkpoint": "auto"}
    cfg = _bench_cfg()
    plain = estimate_step(cfg, {}, 1, 4096, "fp32").peak
    tiled = estimate_step(cfg, {}, 1, 4096, "fp32", MemorySettings(loss_shards=4)).peak
    assert tiled < plain * 0.6  # the logits were most of it
    roomy = KnobContext(DecoderLMAdapter.build(cfg.model, "meta"), cfg=_bench_cfg("64GiB"))
    assert resolve(roomy, knobs, 1, 4096)[0] == MemorySettings()
    between = f"{int((tiled * 1.1 + 512 * 2**20) / 2**20) + 8}MiB"  # loss tiling fits, plain does not
    tight = KnobContext(DecoderLMAdapter.build(cfg.model, "meta"), cfg=_bench_cfg(between))
    chosen, _, fits = resolve(tight, knobs, 1, 4096)
    assert fits and chosen.loss_shards > 1 and chosen.activation_checkpoint == "none"
    hopeless = KnobContext(DecoderLMAdapter.build(cfg.model, "meta"), cfg=_bench_cfg("520MiB"))
    with pytest.raises(ConfigError, match="even with"):
        check_auto(hopeless, [(knobs, 1, 4096)])


def test_plan_shows_each_stages_peak_memory_and_what_each_technique_buys(data_cache, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from rampup.schedule.stages import Schedule
    from rampup.tools.plan import make_plan, plan_summary

    tree = tiny_tree(data_cache, tmp_path, train={"precision": "fp32"})
    tree["model"]["vocab_size"] = 8192  # a vocabulary whose logits matter
    tree["schedule"]["stages"][1] |= {"loss_shards": 4, "activation_checkpoint": "full"}
    cfg = RunConfig.model_validate(tree)
    args = str(write_config(tmp_path / "c.yaml", tree)), "--memory", "--png", str(tmp_path / "p.png"), "--no-time"
    with ThreadPoolExecutor(1) as pool:
        cli = pool.submit(run_rampup, "plan", *args)  # `rampup plan` runs while this process plans the same run
        plan = make_plan(cfg, Schedule.build(cfg.schedule, total=cfg.train.duration), memory="detail")
        short, long = plan_summary(plan)["stages"]
        assert short["memory"]["settings"] == "plain" and long["memory"]["settings"] == "loss x4, ckpt full"
        by = long["memory_by_technique"]
        assert by["all"]["peak"] < by["loss tiles"]["peak"] < by["plain"]["peak"]
        assert by["ckpt full"]["activations"] < by["plain"]["activations"]
        res = cli.result()
    assert res.returncode == 0, res.stderr
    assert "estimated peak memory" in res.stdout and "loss tiles" in res.stdout and "MiB" in res.stdout


@pytest.mark.slow
def test_the_estimate_matches_measured_peaks_of_real_steps():
    """Within 15% of the peak RSS a real step adds to its process (children, malloc returning freed blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    from rampup.tools.probe import run_trial

    cfg = _bench_cfg()
    every = (MemorySettings(), MemorySettings(loss_shards=8), MemorySettings(8, 8, "full"))

    def trial(settings):  # each child measures its own peak RSS: the three run at once
        return run_trial(cfg, {}, 4096, settings, 8 * 2**30, mode="above_rest", precision="fp32", timeout=300)

    with ThreadPoolExecutor(len(every)) as pool:
        trials = list(pool.map(trial, every))
    for settings, t in zip(every, trials, strict=True):
        est = estimate_step(cfg, {}, 1, 4096, "fp32", settings)
        assert t.ok, t.why
        assert t.peak_above_rest == pytest.approx(est.step_peak, rel=0.15), settings.describe()


@pytest.mark.slow
def test_probe_finds_longer_contexts_with_the_techniques_in_held_children(tmp_path):
    """200 MiB above rest: the plain step fits 1536 tokens (estimated 179 MiB) but not 2048 (239 MiB); with
    every technique 4096 fits (121 MiB). Trials: plain 1024, 2048 (fails), 1536; all 1024, 2048, 4096."""
    tree = _bench_cfg().model_dump(mode="json", by_alias=True)
    cfg = write_config(tmp_path / "m.yaml", tree)
    res = run_rampup(
        "probe",
        str(cfg),
        "--memory-limit",
        "200MiB",
        "--above-rest",
        "--techniques",
        "plain",
        "all",
        "--start",
        "1024",
        "--max-seq-len",
        "4096",
        "--refine",
        "1",
        "--json",
        str(tmp_path / "p.json"),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "p.json").read_text())["techniques"]
    plain, every = out["plain"], out["all"]
    assert 1024 <= plain["longest"] < 4096
    assert every["longest"] >= 2 * plain["longest"]
    failed = [t for t in plain["trials"] if not t["ok"]]
    assert failed and failed[0]["why"] == "memory"  # the child's allocation failed, not the machine
    assert "longest seq_len" in res.stdout


def test_auto_in_a_run_picks_per_stage_what_the_limit_needs(data_cache, tmp_path):
    """The short stage (1K tokens a step) fits plain; the long one (4K) only with tiled loss."""
    from rampup.engine.records import read_metrics
    from rampup.engine.trainer import train
    from rampup.knobs.memory import RUNTIME_ALLOWANCE, auto_levels, requested

    tree = tiny_tree(
        data_cache,
        tmp_path / "run",
        train={"duration": "20K tok", "checkpoint_every": None, "threads": 1, "precision": "fp32"},
        log={"progress": "off"},
    )
    tree["model"]["vocab_size"] = 8192
    tree["schedule"]["knobs"]["loss_shards"] = "auto"
    tree["schedule"]["stages"][0]["batch_tokens"] = 1024
    tree["schedule"]["stages"][1]["batch_tokens"] = 4096
    cfg = RunConfig.model_validate(tree)
    levels = auto_levels(requested({"loss_shards": "auto"}), 16, 256, 64, 8192)
    short = estimate_step(cfg, {}, 16, 64, "fp32", levels[0]).peak
    long_plain = estimate_step(cfg, {}, 16, 256, "fp32", levels[0]).peak
    tiled = estimate_step(cfg, {}, 16, 256, "fp32", levels[1]).peak
    limit = int(max(short, tiled) * 1.1 + RUNTIME_ALLOWANCE) + 2**20
    assert limit < long_plain * 1.1 + RUNTIME_ALLOWANCE
    tree["train"]["memory_limit"] = f"{limit // 2**20}MiB"
    train(RunConfig.model_validate(tree))
    mem = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "memory"]
    assert [(r["seq_len"], r["settings"]) for r in mem] == [(64, "plain"), (256, levels[1].describe())]


def test_an_ema_teacher_stage_is_estimated_with_its_teacher():
    """The traced estimate of a stage taught by the run's own EMA holds the teacher's weights and forward
    (its stand-in teacher once had no refresh_from_ema, and the estimate crashed)."""
    cfg = _bench_cfg()
    alone = estimate_step(cfg, {}, 1, 512, "fp32").peak
    taught = estimate_step(cfg, {"teacher": "ema", "distill_weight": 0.5}, 1, 512, "fp32").peak
    assert taught > alone
