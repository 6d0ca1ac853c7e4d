"""Nothing lost: one process per run folder, a resume only on the data it started with, every failed
write and unreadable file named (exit codes of rampup.errors), sizes that cannot fit refused before
compute. The faults that need real processes are in tests/e2e/test_faults.py."""

import os
import re
import subprocess
import sys

import pytest

from conftest import tiny_tree, write_config
from rampup.cli import main
from rampup.config import RunConfig
from rampup.errors import ConfigError, DataError


def test_a_resume_on_another_corpus_is_refused(tmp_path):
    """Two files' contents swapped between stop and resume: the same document and token counts, another
    token stream. The sampler's state records the prepared data's checksums; the resume is refused."""
    from rampup.engine.trainer import Trainer

    src = tmp_path / "docs"
    src.mkdir()
    texts = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40 + 30 * i)) for i in range(12)]
    for i, t in enumerate(texts):
        (src / f"{i:02d}.txt").write_text(t)
    tree = tiny_tree(
        tmp_path / "cache",
        tmp_path / "run",
        data={"source": str(src), "max_files": None},
        train={"duration": "4 steps", "checkpoint_every": "2 steps"},
        log={"progress": "off"},
        eval={"seq_lens": [64], "max_tokens": 128},
    )
    tree["model"]["vocab_size"] = 300
    tree["data"]["tokenizer"] = {"vocab_size": 300}
    tree["schedule"] = {"knobs": {"batch_tokens": 256}, "stages": [{"name": "s", "seq_len": 64}]}
    tree["data"]["val_fraction"] = 0.1
    cfg = RunConfig.model_validate(tree)
    Trainer(cfg).run()
    # the same contents with new mtimes: prepared again into a new cache folder, the same tokens: accepted
    for f in src.iterdir():
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert Trainer(cfg, resume=True).run()["already_finished"]
    assert len(list((tmp_path / "cache").iterdir())) == 2
    a, b = (src / "03.txt").read_text(), (src / "08.txt").read_text()
    (src / "03.txt").write_text(b)
    (src / "08.txt").write_text(a)
    with pytest.raises(
        DataError,
        match=r"the corpus changed since the run started: its train split has the same "
        r"[\d,]+ documents and [\d,]+ tokens, but other tokens .*train.init_from",
    ):
        Trainer(cfg, resume=True).run()


def test_a_step_that_cannot_fit_is_refused_before_compute_and_plan_never_allocates_it(data_cache, tmp_path, capsys):
    from rampup.engine.trainer import Trainer

    for batch in (10**12, 10**8):
        out = tmp_path / f"run{batch}"
        tree = tiny_tree(data_cache, out, schedule={"knobs": {"batch_tokens": batch}}, log={"progress": "off"})
        with pytest.raises(
            ConfigError,
            match=r"a \d+ x (64|256) training step needs about [\d.e+]+ [TG]iB .* more than "
            r"the memory limit",
        ):
            Trainer(RunConfig.model_validate(tree))
        assert not out.exists()  # no config, no metrics, no checkpoint: nothing written
        cfg = write_config(tmp_path / f"big{batch}.yaml", tree)
        assert main(["plan", str(cfg), "--no-time", "--png", str(tmp_path / "p.png")]) == 0
        flat = " ".join(capsys.readouterr().out.split())
        assert re.search(
            r"warning: stage 1 long: a [\d,]+ x 256 step needs about [\d.e+]+ [TG]iB, more than the "
            r"memory limit",
            flat,
        ), flat


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_bytes(b"name: caf\xe9\n"), r"is not UTF-8 text \(byte 9"),
        (lambda p: p.mkdir(), "is a folder, not a file"),
    ],
)
def test_a_config_that_is_not_a_yaml_file_is_named(tmp_path, capsys, make, words):
    path = tmp_path / "run.yaml"
    make(path)
    assert main(["plan", str(path), "--no-time"]) == 2
    assert re.search(words, capsys.readouterr().err)


def test_bad_threads_and_an_out_dir_that_is_a_file_are_named(data_cache, tmp_path, capsys):
    bad = write_config(tmp_path / "t.yaml", tiny_tree(data_cache, tmp_path / "run", train={"threads": -1}))
    assert main(["train", str(bad)]) == 2
    assert "train.threads" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file")
    cfg = write_config(tmp_path / "f.yaml", tiny_tree(data_cache, tmp_path / "taken"))
    assert main(["train", str(cfg)]) == 2
    assert f"train.out_dir {tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "a file"


def test_prepare_removes_what_a_killed_prepare_left(tmp_path):
    from rampup.data import DataConfig, TokenizerConfig, prepare

    cache = tmp_path / "cache"
    cache.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = cache / f".stdlib-0123.tmp-{int(gone.stdout)}"  # the folder of a prepare whose process has ended
    live = cache / f".stdlib-4567.tmp-{os.getpid()}"  # a prepare still running (this process)
    for d in (dead, live):
        d.mkdir()
        (d / "train_0000.bin").write_bytes(b"\0" * 64)
    prepare(DataConfig(source="stdlib", max_files=3, cache_dir=str(cache), tokenizer=TokenizerConfig(vocab_size=300)))
    assert not dead.exists() and live.is_dir()
