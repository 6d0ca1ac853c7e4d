import io
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from rampup.config import RunConfig, dump_config, load_config, set_override
from rampup.errors import ConfigError, RampupError
from rampup.schedule.stages import Schedule
from rampup.tools.plan import make_plan, plot_plan, print_plan

CONFIGS = sorted((Path(__file__).parents[3] / "configs").glob("**/*.yaml"))


def write(tmp_path, tree) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


@pytest.mark.slow  # prepares corpora and traces each plan's memory: ~30 s in all
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_plans(path, data_cache, tmp_path):
    cfg = load_config(path)
    assert cfg.name == yaml.safe_load(path.read_text()).get("name", path.stem)
    if cfg.images is not None:  # an image run: its own plan (the model counted at each size)
        from rampup.tools.images import image_schedule, plan_images

        _, summary = plan_images(cfg)
        assert summary["total_flops"] > 0 and sum(s["steps"] for s in summary["stages"]) == len(
            list(image_schedule(cfg).steps())
        )
        assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg
        return
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration)
    # a buckets run's plan walks the sampler over the real buckets: prepare into the test cache
    planned = load_config(path, [f"data.cache_dir={data_cache}"])
    plan = make_plan(planned, schedule)
    assert plan.total_steps > 0 and plan.total_flops > 0
    assert sum(s.steps for s in plan.stages) == plan.total_steps
    # what `rampup plan` prints and draws of it (the time estimate is tested in test_calibrate)
    out = io.StringIO()
    print_plan(plan, planned, Console(file=out, width=200))
    assert "FLOPs" in out.getvalue() and all(s.name in out.getvalue() for s in schedule.stages)
    assert plot_plan(plan, tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert schedule.max_knob("seq_len") <= cfg.model.max_seq_len
    # the resolved config written into every run folder loads back to the same config
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo_staged.yaml", "demo_baseline.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize(
    "tree, fragment",
    [
        ({"modle": {}}, "unknown key 'modle' (did you mean 'model'?)"),
        ({"model": {"n_layer": 2}}, "unknown key 'model.n_layer' (did you mean 'n_layers'?)"),
        ({"train": {"duraton": "1M tok"}}, "unknown key 'train.duraton' (did you mean 'duration'?)"),
        ({"optimizer": {"warmup": 100}}, "has no unit"),
        ({"train": {"duration": "100"}}, "has no unit"),
        ({"schedule": {"stages": [{"seq_len": 2048}]}, "model": {"max_seq_len": 1024}}, "raise model.max_seq_len"),
        ({"schedule": {"stages": [{"duration": "1M tok", "seq_len": 64, "lr_multt": 2}]}}, "did you mean 'lr_mult'"),
        ({"eval": {"seq_lens": [4096]}}, "beyond model.max_seq_len"),
        (
            {
                "data": {"sampler": "fixed"},
                "schedule": {"stages": [{"duration": "50%", "seq_len": 64}, {"seq_len": 128}]},
            },
            "use data.sampler: staged",
        ),
        ({"optimizer": {"warmup": "10 steps"}}, "counted in tokens"),
        ({"data": {"tokenizer": {"vocab_size": 1000}}, "model": {"vocab_size": 2000}}, "set model.vocab_size only"),
        (
            {"schedule": {"stages": [{"rope": {"method": "yarn", "factor": 2, "original_max_length": 512}}]}},
            "unknown key 'schedule.stages.0.rope.original_max_length' (did you mean 'original_max_len'?); "
            "valid keys in schedule.stages.0.rope: method, base, factor, original_max_len",
        ),
        (
            {"schedule": {"knobs": {"batch_tokens": 1024, "attention": {"kindd": "window"}}}},
            "unknown key 'schedule.knobs.attention.kindd' (did you mean 'kind'?)",
        ),
        (
            {"schedule": {"stages": [{"duration": 0.7, "seq_len": 64}, {"seq_len": 128}]}},
            "schedule.stages.0.duration: duration 0.7 has no unit; a share of the run is written '70%'",
        ),
    ],
)
def test_bad_configs_name_key_and_fix(tmp_path, tree, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, tree))
    assert fragment in str(info.value) and "(top level)" not in str(info.value)


def test_every_knob_check_of_one_file_is_reported_at_once(tmp_path):
    """Two knobs' problems in one file: both named in one error, not one per run."""
    tree = {
        "model": {"max_seq_len": 1024},
        "data": {"sampler": "fixed"},
        "schedule": {"stages": [{"duration": "50%", "seq_len": 64}, {"seq_len": 2048}]},
    }
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, tree))
    assert "schedule.stages.1.seq_len reaches 2048" in str(info.value) and "use data.sampler: staged" in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


def test_overrides(tmp_path):
    p = write(
        tmp_path,
        {
            "schedule": {
                "knobs": {"batch_tokens": 4096},
                "stages": [{"duration": "50%", "seq_len": 64}, {"seq_len": 128}],
            },
            "train": {"duration": "1M tok"},
        },
    )
    cfg = load_config(
        p,
        [
            "schedule.stages.1.seq_len=256",
            "train.duration=2M tok",
            "optimizer.lr=1e-3",
            "optimizer.betas=[0.9, 0.99]",
            "model.max_seq_len=512",
            "name=other",
        ],
    )
    assert cfg.schedule.stages[1].knobs["seq_len"] == 256
    assert str(cfg.train.duration) == "2000000 tok" and cfg.optimizer.lr == 1e-3
    assert cfg.optimizer.betas == (0.9, 0.99) and cfg.name == "other"
    with pytest.raises(ConfigError, match="not an index"):
        load_config(p, ["schedule.stages.5.seq_len=1"])
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(p, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(p, ["optimizer.lr"])


def test_set_override_creates_sections():
    tree = {}
    set_override(tree, "train.duration=5M tok")
    assert tree == {"train": {"duration": "5M tok"}}


def test_defaults_alone_are_a_valid_config():
    cfg = load_config(None)
    assert cfg.model.vocab_size == cfg.data.tokenizer.vocab_size


keys = st.sampled_from(
    [
        "model.dim",
        "train.duration",
        "optimizer.warmup",
        "schedule.stages.0.seq_len",
        "eval.seq_lens",
        "data.val_fraction",
        "model.nope",
        "train",
        "optimizer.betas",
    ]
)
values = st.one_of(
    st.integers(-5, 5000),
    st.text(max_size=12),
    st.floats(allow_nan=True),
    st.none(),
    st.lists(st.integers(0, 3000), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_fuzz_overrides_validate_or_raise_our_error(pairs):
    """Any override either validates or raises rampup's own error type, never anything else."""
    base = CONFIGS[0]
    overrides = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in pairs
    ]
    try:
        cfg = load_config(base, overrides)
    except RampupError:
        return
    assert isinstance(cfg, RunConfig)


def _leaf_keys(cls, prefix=()) -> list[tuple[str, ...]]:
    """Every key path of the config, from the sections' own fields (stages and knobs aside)."""
    from rampup.config import _section_class

    out = []
    for name, field in cls.model_fields.items():
        sub = _section_class(field.annotation)
        key = prefix + (field.alias or name,)
        out += _leaf_keys(sub, key) if sub is not None and name not in ("stages", "knobs") else [key]
    return out


LEAVES = _leaf_keys(RunConfig)
scalars = st.one_of(
    st.integers(-10, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=10),
    st.sampled_from(["1M tok", "25%", "10 steps", "auto", "cpu", "skip", "rollback", "stdlib", "fp32"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)
paths = st.one_of(
    st.sampled_from(LEAVES),
    st.lists(st.sampled_from(["model", "train", "nonfinite", "x", "data"]), min_size=1, max_size=3).map(tuple),
)


def _tree(pairs) -> dict:
    tree: dict = {}
    for path, value in pairs:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node[path[-1]] = value
    return tree


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(paths, values), max_size=6))
def test_fuzz_config_files_validate_or_raise_our_error(tmp_path, pairs):
    """Any YAML tree over the real keys (and wrong ones) loads to a RunConfig or raises RampupError."""
    path = write(tmp_path, _tree(pairs))
    try:
        cfg = load_config(path)
    except RampupError:
        return
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg

    def finite(x) -> bool:
        if isinstance(x, dict):
            return all(finite(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return all(finite(v) for v in x)
        return not isinstance(x, float) or math.isfinite(x)

    assert finite(cfg.model_dump())  # a validated config never holds NaN or infinity


def _takes_floats(path: tuple[str, ...]) -> bool:
    cls = RunConfig
    for key in path[:-1]:
        from rampup.config import _section_class

        cls = _section_class(cls.model_fields[key].annotation)
    return "float" in str(cls.model_fields[path[-1]].annotation)


@pytest.mark.parametrize("path", [p for p in LEAVES if _takes_floats(p)], ids=".".join)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_no_setting_takes_nan_or_infinity(tmp_path, path, value):
    tree = _tree([(path, "PLACEHOLDER")])
    text = yaml.safe_dump(tree).replace("PLACEHOLDER", value)
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=".".join(path)):
        load_config(tmp_path / "run.yaml")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from(
            list("{}[]:,-!&*|>'\"#% \n\tab1.")
            + ["!!python/object/apply:os.system ", "model:", "train:", "\n  ", "lr: ", "seed"]
        ),
        max_size=30,
    ).map("".join)
)
def test_fuzz_raw_yaml_text_validates_or_raises_our_error(tmp_path, text):
    """Arbitrary text, tags that would run code under an unsafe loader included: never a crash."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except RampupError:
        pass


def test_yaml_tags_never_run_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "run.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


def test_paths_in_a_config_file_are_read_from_its_folder(tmp_path):
    (tmp_path / "proj" / "corpus").mkdir(parents=True)
    path = tmp_path / "proj" / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "corpus"}}))
    assert load_config(path).data.source == str(tmp_path / "proj" / "corpus")
    assert load_config(path, ["data.source=elsewhere"]).data.source == "elsewhere"  # --set: where it was typed
    path.write_text(yaml.safe_dump({"model": {"source": "hf", "path": "missing"}}))
    with pytest.raises(ConfigError, match=f"model.path {tmp_path / 'proj' / 'missing'} does not exist"):
        load_config(path)
