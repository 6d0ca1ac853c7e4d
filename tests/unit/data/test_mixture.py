"""Data mixtures (rampup.data.mixture, the mix knob): the row split, the sampler over real prepared
corpora (two folders of text whose alphabets do not overlap, so every row names its source), subsets,
state, and the errors of bad mixtures before any compute."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import mix_tree, tiny_tree
from rampup.config import RunConfig
from rampup.data.dataset import TokenDataset
from rampup.data.mixture import MixtureSampler, prepare_sources, split_rows, subset_documents
from rampup.data.tokenizer import load_tokenizer
from rampup.engine.rundata import prepare_run, step_shapes
from rampup.errors import ConfigError, DataError, RampupError
from rampup.schedule.stages import Schedule


# ----------------------------------------------------------------------------- the split
@settings(max_examples=300, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda n: st.lists(
            st.tuples(st.integers(1, 64), st.lists(st.integers(0, 9), min_size=n, max_size=n).filter(any)),
            min_size=1,
            max_size=40,
        )
    )
)
def test_cumulative_rows_stay_within_one_row_of_the_weights_target(steps):
    n = len(steps[0][1])
    counts, target = [0] * n, [0.0] * n
    exact = [0.0] * n
    for rows, w in steps:
        weights = np.array(w, dtype=np.float64) / sum(w)
        before = list(counts)
        got = split_rows(counts, target, weights, rows)
        assert sum(got) == rows and all(g >= 0 for g in got)
        assert [b + g for b, g in zip(before, got, strict=True)] == counts
        for i in range(n):
            exact[i] += w[i] * rows / sum(w)
            assert abs(counts[i] - exact[i]) < 1 + 1e-6, (counts, exact)
            if w[i] == 0:
                assert got[i] <= 1  # a source weighing 0 gets at most the row it is owed


# ----------------------------------------------------------------------------- two real corpora
@pytest.fixture(scope="module")
def corpora(two_corpora):
    return two_corpora


def config(tree) -> RunConfig:
    return RunConfig.model_validate(tree)


def _vocab_sides(corpora, cfg):
    folders = prepare_sources(cfg.data)
    tok = load_tokenizer(Path(cfg.data.tokenizer.path or next(iter(folders.values())) / "tokenizer.json"))
    vocab = tok.get_vocab()
    side = np.full(max(vocab.values()) + 1, -1)
    for i in vocab.values():
        text = tok.decode([i])
        if text and all(c in "abcdefghij" for c in text.strip()) and text.strip():
            side[i] = 0
        elif text and all(c in "0123456789" for c in text.strip()) and text.strip():
            side[i] = 1
    return side


def _sources_of_rows(x: torch.Tensor, side: np.ndarray) -> list[int]:
    out = []
    for row in x.numpy():
        s = {int(side[t]) for t in row if side[t] >= 0}
        assert len(s) == 1, "a row mixes two sources"
        out.append(s.pop())
    return out


def test_a_staged_mixture_serves_each_source_its_ramped_share_of_rows(corpora, tmp_path):
    tree = mix_tree(corpora, tmp_path / "run", train={"duration": "20 steps"})
    tree["schedule"]["stages"][0]["mix"] = {"letters": 1.0}
    tree["schedule"]["stages"][1]["mix"] = {"letters": {"from": 0.75, "to": 0.25}, "digits": {"from": 0.25, "to": 0.75}}
    cfg = config(tree)
    data = prepare_run(cfg)
    side = _vocab_sides(corpora, cfg)
    sampler = data.sampler
    assert isinstance(sampler, MixtureSampler)
    cum, exact = np.zeros(2), np.zeros(2)
    for sp in data.schedule.steps():
        x, y = sampler.take(sp)
        assert x.shape == (sp.batch_size, sp.seq_len) and torch.equal(x[:, 1:], y[:, :-1])
        got = np.bincount(_sources_of_rows(x, side), minlength=2)
        cum += got
        w = sp.knobs["mix"]
        exact += np.array([w.get("letters", 0.0), w.get("digits", 0.0)]) / sum(w.values()) * sp.batch_size
        assert np.abs(cum - exact).max() < 1 + 1e-9
        assert sampler.last == {"letters": int(got[0]) * sp.seq_len, "digits": int(got[1]) * sp.seq_len}
    assert cum[1] > 0 and cum[0] > cum[1]  # stage 0 letters only, stage 1 from 3:1 to 1:3


def test_a_bucket_mixture_draws_one_bucket_per_step_and_splits_its_sequences_by_weight(corpora, tmp_path):
    tree = mix_tree(corpora, tmp_path / "run", train={"duration": "30 steps"})
    tree["data"]["sampler"] = "buckets"
    tree["data"]["buckets"] = {"min_log2": 4, "max_log2": 7, "repeat": True}
    tree["schedule"] = {
        "knobs": {"batch_tokens": 1024, "seq_len": 128, "mix": {"letters": 0.5, "digits": 0.5}},
        "stages": [{"name": "all", "bucket_odds": "grow-p2"}],
    }
    tree["eval"] = {"seq_lens": [128], "max_tokens": 1024}
    cfg = config(tree)
    data = prepare_run(cfg)
    side = _vocab_sides(corpora, cfg)
    counts = np.zeros(2)
    lengths = set()
    for sp, shape in zip(data.schedule.steps(), data.step_shapes, strict=True):
        x, _ = data.sampler.take(sp)
        assert tuple(x.shape) == shape and x.numel() == 1024  # constant tokens, the planned shape
        lengths.add(x.shape[1])
        counts += np.bincount(_sources_of_rows(x, side), minlength=2) * x.shape[1]
    assert len(lengths) > 1
    assert abs(counts[0] - counts[1]) <= 2 * 128  # equal weights: within a row of each other per source


def test_the_mixture_resumes_exactly_from_its_state(corpora, tmp_path):
    tree = mix_tree(corpora, tmp_path / "run", train={"duration": "16 steps"})
    tree["schedule"]["knobs"]["mix"] = {"letters": 0.3, "digits": 0.7}
    cfg = config(tree)
    a = prepare_run(cfg)
    steps = list(a.schedule.steps())
    for sp in steps[:7]:
        a.sampler.take(sp)
    state = a.sampler.state_dict()
    import json

    state = json.loads(json.dumps(state))  # what a checkpoint holds
    rest_a = [a.sampler.take(sp) for sp in steps[7:]]
    b = prepare_run(cfg)
    b.sampler.load_state_dict(state)
    rest_b = [b.sampler.take(sp) for sp in steps[7:]]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(rest_a, rest_b, strict=True))
    other = config(mix_tree(corpora, tmp_path / "run", sources={"letters": {"source": str(corpora["letters"])}}))
    with pytest.raises(ConfigError, match="data.sources the run was started with"):
        prepare_run(other).sampler.load_state_dict(state)


def test_a_subset_is_fixed_whole_documents_served_for_several_epochs(corpora, tmp_path):
    sources = {
        "letters": {"source": str(corpora["letters"])},
        "small": {"source": str(corpora["digits"]), "subset": "3K tok"},
    }
    tree = mix_tree(corpora, tmp_path / "run", sources=sources, train={"duration": "40 steps"})
    tree["schedule"]["knobs"]["mix"] = {"letters": 0.5, "small": 0.5}
    cfg = config(tree)
    data = prepare_run(cfg)
    small = data.sampler.sources[1].dataset
    full = TokenDataset.open(prepare_sources(cfg.data)["small"], "train")
    assert 3000 <= small.n_tokens < 3000 + full.doc_lengths.max()
    assert np.array_equal(small.doc_ids, subset_documents(full, 3000, "small"))  # fixed: the same every time
    docs = {bytes(np.asarray(small.doc(i)).tobytes()) for i in range(small.n_docs)}
    served = np.concatenate([np.asarray(small.doc(i)) for i in range(small.n_docs)])
    for sp in data.schedule.steps():
        data.sampler.take(sp)
    assert data.sampler.epochs()["small"] > 2  # repeated: a small set trained for several epochs
    assert len(docs) == small.n_docs and len(served) == small.n_tokens
    with pytest.raises(ConfigError, match="subset asks for"):
        bad = {**sources, "small": {"source": str(corpora["digits"]), "subset": "10M tok"}}
        prepare_run(config(mix_tree(corpora, tmp_path / "run", sources=bad)))


def test_per_source_evaluation_and_token_records(corpora, tmp_path):
    from rampup.engine.records import read_metrics
    from rampup.engine.trainer import train

    tree = mix_tree(corpora, tmp_path / "run", train={"duration": "8 steps", "checkpoint_every": None})
    tree["schedule"]["knobs"]["mix"] = {"letters": 0.5, "digits": 0.5}
    tree["eval"] = {"seq_lens": [64], "max_tokens": 1024, "every": "4 steps"}
    train(config(tree), display_mode="off")
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    mixes = [r for r in recs if r["event"] == "mix"]
    steps = [r for r in recs if r["event"] == "step"]
    assert [m["step"] for m in mixes] == [s["step"] for s in steps]
    assert all(
        sum(m["tokens"].values()) == s["tokens"] - p
        for m, s, p in zip(mixes, steps, [0] + [s["tokens"] for s in steps][:-1], strict=True)
    )
    evals = [r for r in recs if r["event"] == "eval"]
    by = {}
    for r in evals:
        by.setdefault((r["step"], r.get("set")), r["loss"])
    for step in (4, 8):
        pooled, a, b = by[step, None], by[step, "letters"], by[step, "digits"]
        assert min(a, b) <= pooled <= max(a, b) and a != b  # the pooled loss lies between the sources'


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "mix, words",
    [
        ({"letters": -1.0, "digits": 1.0}, "must be a weight >= 0"),
        ({"letters": 0.0, "digits": 0.0}, "all zero"),
        ({"letters": 1.0, "digts": 1.0}, "names the source 'digts'.*did you mean 'digits'"),
        ({"letters": {"from": 1.0, "to": -0.5}}, "negative weight"),
    ],
)
def test_bad_weights_are_named_when_the_config_loads(corpora, tmp_path, mix, words):
    tree = mix_tree(corpora, tmp_path / "run")
    tree["schedule"]["stages"][1]["mix"] = mix
    with pytest.raises((ValueError, RampupError), match=words):
        config(tree)


def test_mix_without_sources_and_source_with_sources_are_refused(corpora, tmp_path):
    tree = tiny_tree(corpora["cache"], tmp_path / "run")
    tree["schedule"]["knobs"]["mix"] = {"a": 1.0}
    with pytest.raises(ValueError, match="define data.sources"):
        config(tree)
    tree = mix_tree(corpora, tmp_path / "run")
    tree["data"]["source"] = str(corpora["letters"])
    with pytest.raises(ValueError, match="data.source and data.sources are exclusive"):
        config(tree)


def test_a_source_whose_tokenizer_differs_is_refused_before_any_data_is_read(corpora, tmp_path):
    cfg = config(mix_tree(corpora, tmp_path / "run"))
    folders = prepare_sources(cfg.data)
    own = folders["letters"] / "tokenizer.json"
    from rampup.data.tokenizer import train_tokenizer

    other = tmp_path / "other.json"
    train_tokenizer(["zzz yyy xxx " * 50], 300).save(str(other))
    sources = {
        "letters": {"source": str(corpora["letters"]), "tokenizer": str(own)},
        "digits": {"source": str(corpora["digits"]), "tokenizer": str(other)},
    }
    with pytest.raises(ConfigError, match="data.sources.digits.tokenizer .* differs from the mixture's tokenizer"):
        prepare_sources(config(mix_tree(corpora, tmp_path / "run", sources=sources)).data)


def test_a_source_that_runs_dry_with_repeat_false_is_a_plan_time_error(corpora, tmp_path):
    sources = {
        "letters": {"source": str(corpora["letters"])},
        "digits": {"source": str(corpora["digits"]), "subset": "2K tok", "repeat": False},
    }
    tree = mix_tree(corpora, tmp_path / "run", sources=sources, train={"duration": "30 steps"})
    tree["schedule"]["knobs"]["mix"] = {"letters": 0.5, "digits": 0.5}
    cfg = config(tree)
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration)
    with pytest.raises(DataError, match="source 'digits' ran dry at step .*repeat: true"):
        step_shapes(cfg, schedule)
    sources["digits"]["repeat"] = True
    assert (
        len(
            step_shapes(
                config(mix_tree(corpora, tmp_path / "run", sources=sources, train={"duration": "30 steps"})), schedule
            )
        )
        == 30
    )
