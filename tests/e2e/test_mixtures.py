"""Data mixtures end to end: a mixture run killed and resumed is bitwise the uninterrupted one (staged and
buckets), two ranks draw the same sources per step with disjoint rows, and compare / report --on a source."""

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import alongside, mix_tree, rampup_cmd, run_rampup, wait_for, write_config
from rampup.config import RunConfig
from rampup.engine.checkpoint.format import latest_checkpoint
from rampup.engine.records import read_metrics

pytestmark = pytest.mark.slow


def mixture(corpora, out, sampler: str) -> dict:
    """Three sources (one a repeated subset), a ramped mix, 24 steps with a checkpoint every 6."""
    sources = {
        "letters": {"source": str(corpora["letters"])},
        "digits": {"source": str(corpora["digits"])},
        "hq": {"source": str(corpora["digits"]), "subset": "4K tok"},
    }
    tree = mix_tree(
        corpora,
        out,
        sources=sources,
        train={"duration": "24 steps", "checkpoint_every": "6 steps", "precision": "fp32"},
        eval={"seq_lens": [128], "max_tokens": 1024, "every": "12 steps"},
    )
    if sampler == "buckets":
        tree["data"] |= {"sampler": "buckets", "buckets": {"min_log2": 4, "max_log2": 7, "repeat": True}}
        tree["schedule"] = {"knobs": {"batch_tokens": 1024, "seq_len": 128}, "stages": [{"name": "a"}, {"name": "b"}]}
        tree["schedule"]["stages"][0] |= {"duration": "50%", "bucket_odds": "grow-p2"}
    else:
        tree["schedule"]["stages"][1]["seq_len"] = 128
    tree["schedule"]["stages"][0]["mix"] = {"letters": 0.7, "digits": 0.3}
    tree["schedule"]["stages"][1]["mix"] = {
        "letters": {"from": 0.5, "to": 0.2},
        "digits": 0.3,
        "hq": {"from": 0, "to": 0.5},
    }
    return tree


def steps_of(out):
    return [
        (r["loss"], r["seq_len"], r["batch_size"]) for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"
    ]


def run_all(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """``run_rampup(*command)`` for each command at the same time (independent commands, other outputs)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda command: run_rampup(*command), commands))


@pytest.mark.parametrize("sampler", ["staged", "buckets"])
def test_a_killed_mixture_run_resumes_bitwise(two_corpora, tmp_path, sampler):
    from test_distributed import prepared

    ref = tmp_path / "ref"
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", mixture(two_corpora, out, sampler))
    # the uninterrupted reference trains on the other core while its twin is killed and resumed
    prepared(cfg)  # the two processes then only read the cache (see test_distributed.train_together)
    with alongside("train", str(write_config(tmp_path / "ref.yaml", mixture(two_corpora, ref, sampler)))):
        proc = subprocess.Popen(rampup_cmd("train", str(cfg)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: (out / "checkpoints" / "step_0000012").is_dir(), proc, timeout=600)
        proc.kill()
        proc.wait()
        assert len(steps_of(out)) < 24
        res = run_rampup("train", str(cfg), "--resume")
        assert res.returncode == 0, res.stderr[-3000:]
    assert steps_of(out) == steps_of(ref)
    a = (latest_checkpoint(out / "checkpoints") / "model.safetensors").read_bytes()
    assert a == (latest_checkpoint(ref / "checkpoints") / "model.safetensors").read_bytes()
    mixes = [r["tokens"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "mix"]
    assert mixes == [r["tokens"] for r in read_metrics(ref / "metrics.jsonl") if r["event"] == "mix"]
    assert sum(m["hq"] for m in mixes) > 0 and sum(m["hq"] for m in mixes[:12]) == 0
    if sampler == "buckets":
        assert len({s[1] for s in steps_of(out)}) > 1


def test_two_ranks_draw_the_same_sources_per_step_with_disjoint_rows(two_corpora, tmp_path):
    from rampup.engine.distributed import Dist
    from rampup.engine.rundata import prepare_run

    tree = mixture(two_corpora, tmp_path / "run", "buckets")
    data = prepare_run(RunConfig.model_validate(tree))
    ranks = [Dist(rank=r, world=2) for r in range(2)]
    for sp in data.schedule.steps():
        x, _ = data.sampler.take(sp)
        rows = [d.shard_rows(x) for d in ranks]
        assert rows[0].shape == rows[1].shape and rows[0].shape[0] * 2 == x.shape[0]
        a, b = ({tuple(r) for r in part.tolist()} for part in rows)
        assert not a & b or len({tuple(r) for r in x.tolist()}) < x.shape[0]  # disjoint unless the batch repeats


def test_a_two_rank_mixture_run_matches_one_rank(two_corpora, tmp_path):
    from test_distributed import assert_match, records, train_together

    outs, runs = {}, []
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        tree = mixture(two_corpora, out, "buckets")
        tree["train"] |= {"checkpoint_every": None, "duration": "12 steps"}
        runs.append((write_config(tmp_path / f"r{n}.yaml", tree), {"nproc": n}))
        outs[n] = out
    train_together(*runs)  # side by side
    assert steps_of(outs[1])[0][1:] == steps_of(outs[2])[0][1:]
    assert [s[1:] for s in steps_of(outs[1])] == [s[1:] for s in steps_of(outs[2])]  # the same shapes every step
    assert_match(records(outs[2]), records(outs[1]), range(1, 13))
    mixes = [[r["tokens"] for r in read_metrics(o / "metrics.jsonl") if r["event"] == "mix"] for o in outs.values()]
    assert mixes[0] == mixes[1]


def test_compare_and_report_on_one_source(two_corpora, tmp_path):
    from test_distributed import prepared

    runs, configs = [], []
    for name, mix in (("replay", {"letters": 0.5, "digits": 0.5}), ("only", {"digits": 1.0})):
        tree = mix_tree(
            two_corpora,
            tmp_path / name,
            train={"duration": "12 steps", "checkpoint_every": None},
            eval={"seq_lens": [64], "max_tokens": 1024, "every": "4 steps"},
        )
        tree["name"] = name
        tree["schedule"]["knobs"]["mix"] = mix
        configs.append(("train", str(write_config(tmp_path / f"{name}.yaml", tree))))
        prepared(tmp_path / f"{name}.yaml")
        runs.append(str(tmp_path / name))
    for res in run_all(*configs):  # the two runs side by side
        assert res.returncode == 0, res.stderr[-3000:]
    # the compares and reports read the runs and write to their own folders: all of them side by side
    pooled, *on_source, nope, report = run_all(
        ("compare", *runs, "--out", str(tmp_path / "cmp")),  # same sources, other mixes: pooled loss
        *(
            ("compare", *runs, "--on", source, "--out", str(tmp_path / f"cmp_{source}"))
            for source in ("letters", "digits")
        ),
        ("report", runs[0], "--on", "nope"),
        ("report", runs[0], "--on", "letters"),
    )
    assert pooled.returncode == 0, pooled.stderr[-3000:]
    for source, res in zip(("letters", "digits"), on_source, strict=True):
        assert res.returncode == 0, res.stderr[-3000:]
        result = json.loads((tmp_path / f"cmp_{source}" / "compare.json").read_text())
        assert result["on"] == source
        finals = {
            r.get("set"): r["loss"]
            for r in read_metrics(tmp_path / "replay" / "metrics.jsonl")
            if r["event"] == "eval" and r["step"] == 12
        }
        group = next(g for g in result["groups"] if g["runs"] == ["replay"])
        assert group["lengths"]["64"]["final_loss"]["median"] == pytest.approx(finals[source])
    assert nope.returncode != 0 and "no source named 'nope'" in nope.stderr
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "replay" / "report" / "report.html").read_text()
    assert "sources of replay" in html
