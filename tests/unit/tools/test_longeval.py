"""Long-context evaluation: passkey examples and scoring, the mixture knob, loss by position, rampup eval."""

import json

import numpy as np
import pytest
import torch

from conftest import run_rampup, tiny_tree, write_config
from rampup.data import DataConfig, TokenizerConfig, prepare
from rampup.data.passkey import PasskeyTemplate, inject_passkeys, passkey_example
from rampup.data.prepare import load_prepared_tokenizer
from rampup.engine.evaluation import passkey_accuracy
from rampup.errors import ConfigError
from rampup.models.llm import DecoderLM, ModelConfig
from rampup.tools.longeval import loss_by_position


@pytest.fixture(scope="module")
def template(data_cache) -> PasskeyTemplate:
    folder = prepare(DataConfig(max_files=40, cache_dir=str(data_cache), tokenizer=TokenizerConfig(vocab_size=512)))
    return PasskeyTemplate(load_prepared_tokenizer(folder))


def test_example_places_the_key_at_its_depth_and_ends_with_the_answer(template):
    filler = np.arange(1000, 1400) % 500
    needle, question, answer = template.pieces(31415)
    for depth in (0.0, 0.5, 1.0):
        ex, n = passkey_example(filler, 128, depth, 31415, template)
        assert len(ex) == 129 and n == len(answer)
        assert ex[-n:].tolist() == answer and ex[-n - len(question) : -n].tolist() == question
        text = template.tok.decode(ex.tolist())
        assert text.count("31415") == 3  # twice in the needle, once as the answer
        start = next(i for i in range(len(ex)) if ex[i : i + len(needle)].tolist() == needle)
        n_fill = 129 - len(needle) - len(question) - n
        assert start == round(depth * n_fill)
    with pytest.raises(ConfigError, match="lengths >="):
        passkey_example(filler, 10, 0.5, 31415, template)


class Oracle(torch.nn.Module):
    """Predicts each next token from a lookup of the true sequences: scores 100% if the scoring is right."""

    def __init__(self, batch: torch.Tensor, vocab: int, wrong_at: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batch, self.vocab, self.wrong_at = batch, vocab, wrong_at

    def forward(self, x):
        y = self.batch[:, 1 : x.shape[1] + 1].clone()
        if self.wrong_at is not None:
            y[:, self.wrong_at] = (y[:, self.wrong_at] + 1) % self.vocab
        return torch.nn.functional.one_hot(y, self.vocab).float()


def test_accuracy_scores_exactly_the_answer_tokens(template):
    stream = np.random.default_rng(0).integers(0, 500, 5000)
    T = 96
    # rebuild the batch passkey_accuracy will draw (same seed) to give the oracle the truth
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(4):
        start = int(rng.integers(0, len(stream) - T - 1))
        rows.append(
            passkey_example(stream[start : start + T + 1], T, 0.5, int(rng.integers(10000, 99999)), template)[0]
        )
    batch = torch.from_numpy(np.stack(rows))
    acc = passkey_accuracy(Oracle(batch, 512), template, stream, [T], [0.5], 4, seed=3, precision="fp32")
    assert acc == {T: {0.5: 1.0}}
    wrong_last = passkey_accuracy(
        Oracle(batch, 512, wrong_at=T - 1), template, stream, [T], [0.5], 4, seed=3, precision="fp32"
    )
    assert wrong_last == {T: {0.5: 0.0}}  # one wrong key token fails the example
    wrong_filler = passkey_accuracy(
        Oracle(batch, 512, wrong_at=3), template, stream, [T], [0.5], 4, seed=3, precision="fp32"
    )
    assert wrong_filler == {T: {0.5: 1.0}}  # filler predictions do not count


def test_inject_passkeys_rewrites_about_the_fraction_and_keeps_the_shift(template):
    x = torch.randint(0, 500, (200, 128))
    y = torch.cat([x[:, 1:], torch.randint(0, 500, (200, 1))], 1)
    before = x.clone()
    n = inject_passkeys(x, y, 0.25, template, np.random.default_rng(0))
    changed = (x != before).any(1)
    assert 30 < n < 70 and int(changed.sum()) == n
    assert torch.equal(x[:, 1:], y[:, :-1])
    question = torch.tensor(template.pieces(0)[1])
    for b in torch.nonzero(changed).flatten().tolist():
        row = torch.cat([x[b], y[b, -1:]])
        assert any(torch.equal(row[i : i + len(question)], question) for i in range(len(row) - len(question)))
    short = torch.randint(0, 500, (4, 8))
    assert inject_passkeys(short, short.clone(), 1.0, template, np.random.default_rng(0)) == 0


def test_loss_by_position_averages_to_the_window_loss():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=64))
    windows = torch.randint(0, 64, (5, 65))
    buckets = loss_by_position(model, windows, 4, precision="fp32")
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    logits = model(windows[:, :-1])
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert np.mean([b["loss"] for b in buckets]) == pytest.approx(full, rel=1e-5)


@pytest.mark.slow
def test_rampup_eval_reports_lengths_beyond_training(data_cache, tmp_path):
    tree = tiny_tree(data_cache, tmp_path / "run", train={"duration": "8 steps", "checkpoint_every": None})
    tree["schedule"]["stages"][1]["rope"] = {"method": "yarn", "factor": 4, "original_max_len": 64}
    cfg = write_config(tmp_path / "run.yaml", tree)
    assert run_rampup("train", str(cfg)).returncode == 0
    res = run_rampup(
        "eval", str(tmp_path / "run"), "--lengths", "64", "256", "512", "--passkey-samples", "2", "--max-tokens", "2048"
    )
    assert res.returncode == 0, res.stderr
    assert "beyond training" in res.stdout
    r = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(r["loss"]) == {"64", "256", "512"} and r["rope"] == "yarn x4 from 64"
    assert set(r["passkey"]) == {"256", "512"} and all(len(v) == 5 for v in r["passkey"].values())
    assert r["loss_by_position"]["seq_len"] == 512 and len(r["loss_by_position"]["buckets"]) == 8
    bad = run_rampup("eval", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "neither a checkpoint nor a run folder" in bad.stderr


def test_rampup_eval_scores_a_windowed_run_with_its_window(data_cache, tmp_path):
    """The run's last stage is windowed: rampup eval scores it windowed, as the run's own final eval did."""
    from conftest import tiny_tree
    from rampup.config import RunConfig
    from rampup.data.dataset import TokenDataset
    from rampup.data.prepare import get_prepared
    from rampup.data.samplers import eval_windows
    from rampup.engine.checkpoint.format import latest_checkpoint, load_checkpoint
    from rampup.engine.trainer import evaluate, train
    from rampup.models.llm import DecoderLM
    from rampup.tools.longeval import evaluate_run

    out = tmp_path / "run"
    tree = tiny_tree(
        data_cache,
        out,
        train={"duration": "12 steps", "checkpoint_every": None},
        eval={"seq_lens": [256], "max_tokens": 2048},
        log={"progress": "off"},
    )
    tree["schedule"]["stages"][1] |= {"attention": {"kind": "window"}, "window": 16}
    cfg = RunConfig.model_validate(tree)
    summary = train(cfg)
    r = evaluate_run(out, lengths=[256], passkey_samples=0, max_tokens=2048)
    assert r["attention"] == "window, window 16"
    assert r["loss"]["256"] == pytest.approx(summary["val_loss"]["256"], abs=1e-6)
    model = DecoderLM(cfg.model)  # full causal attention: what rampup eval used to score
    load_checkpoint(latest_checkpoint(out / "checkpoints"), model, None)
    val = TokenDataset.open(get_prepared(cfg.data), "val")
    full = evaluate(model, eval_windows(val, 256, 2048), precision=summary["precision"]["precision"])
    assert abs(full - r["loss"]["256"]) > 20e-6  # 20x the tolerance above: the window really changed the score
