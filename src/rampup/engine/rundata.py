"""The data seam (:class:`RunData`) and :func:`prepare_run`: everything a run reads, checked
before any compute."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rampup.config import RunConfig
from rampup.engine.evaluation import window_batches
from rampup.errors import ConfigError, DataError
from rampup.knobs import graph_id
from rampup.schedule import Schedule


@dataclass
class RunData:
    """What a run reads, checked before any compute: the data seam.

    ``sampler.take(step_plan)`` gives each step's raw (x, y); ``eval_sets`` maps an evaluation
    length to its batches of (x, y). Token corpora fill the rest (passkey resources); a run on other
    data leaves them None.
    """

    schedule: Schedule
    sampler: Any
    eval_sets: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
    graphs: set[tuple] = field(default_factory=set)
    """Every compiled graph the run will need: batch shapes (micro-batches included) x knob graph keys."""
    train_ds: Any = None
    val_ds: Any = None
    eot_id: int | None = None
    auto_memory_steps: list[tuple[dict[str, Any], int, int]] = field(default_factory=list)
    """(knobs, rows, seq_len) of each distinct step shape whose memory knobs say ``auto`` (rampup.memory)."""
    shapes: set[tuple[int, int]] = field(default_factory=set)
    """Every distinct (global rows, seq_len) of a training step."""
    step_knobs: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    """The knobs of the first step of each distinct (global rows, seq_len): its memory is checked before any step."""
    warnings: list[str] = field(default_factory=list)
    """What the run prints as warnings at its start (a corpus mostly skipped, or repeated many times)."""

    def passkey_template(self):
        from rampup.data.prepare import load_prepared_tokenizer
        from rampup.longeval import PasskeyTemplate

        if self.train_ds is None:
            raise ConfigError("passkey examples need a token corpus and its tokenizer (data.source)")
        return PasskeyTemplate(load_prepared_tokenizer(self.train_ds.folder))

    def passkey_stream(self):
        import numpy as np

        return np.concatenate([self.val_ds.doc(i) for i in range(self.val_ds.n_docs)])


RunInputs = RunData  # the name before the data seam


def micro_shapes(rows: int, seq_len: int, micro_batch_tokens: int | None) -> set[tuple[int, int]]:
    per = rows if micro_batch_tokens is None else max(1, min(rows, micro_batch_tokens // seq_len))
    return {(per, seq_len)} | ({(rows % per, seq_len)} if rows % per else set())


def check_graphs(cfg: RunConfig, graphs: set[tuple]) -> None:
    if cfg.train.compile and len(graphs) > cfg.train.compile_max_graphs:
        raise ConfigError(
            f"train.compile: the run needs {len(graphs)} compiled graphs (distinct batch shapes, and knob "
            f"values such as window that change a graph), more than train.compile_max_graphs "
            f"({cfg.train.compile_max_graphs}); its distinct batch shapes and window widths each compile their "
            "own graph; bucket the lengths (data.sampler: buckets, a seq_len ramp: step, or a coarser "
            "multiple_of), step the window, raise compile_max_graphs, or turn compile off")


def prepare_run(cfg: RunConfig) -> RunData:
    """Everything that can fail on bad input, done before any training compute."""
    from rampup.data.dataset import TokenDataset
    from rampup.data.prepare import corpus_warnings, get_prepared, read_meta
    from rampup.data.samplers import EVAL_WINDOWS, sampler_for_run
    from rampup.plan import step_shapes

    prepared = get_prepared(cfg.data)
    train_ds = TokenDataset.open(prepared, "train", verify=cfg.data.verify_checksums)
    val_ds = TokenDataset.open(prepared, "val", verify=cfg.data.verify_checksums)
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {train_ds.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; set model.vocab_size >= {train_ds.vocab_size}")
    schedule = Schedule.build(cfg.schedule, total=cfg.train.duration, tokens_per_epoch=train_ds.n_tokens)
    eval_lens = cfg.eval.seq_lens or [schedule.max_knob("seq_len")]
    for n in eval_lens:
        if val_ds.n_tokens < n + 1:
            raise DataError(f"the validation split has {val_ds.n_tokens} tokens, too few for eval at seq_len {n}; "
                            "raise data.val_fraction or lower eval.seq_lens")
    sampler = sampler_for_run(cfg.data, train_ds, cfg.train.seed, schedule)
    from rampup.memory import _is_auto, requested

    graphs: set[tuple] = set()
    shapes: set[tuple[int, int]] = set()
    step_knobs: dict[tuple[int, int], dict[str, Any]] = {}
    auto: dict[tuple, tuple[dict[str, Any], int, int]] = {}
    for sp, (rows, seq_len) in zip(schedule.steps(), step_shapes(cfg, schedule)):  # buckets: the draws, dry
        graphs |= {graph_id(sp.knobs, s) for s in micro_shapes(rows, seq_len, cfg.train.micro_batch_tokens)}
        shapes.add((rows, seq_len))
        step_knobs.setdefault((rows, seq_len), sp.knobs)
        mem = requested(sp.knobs)
        if _is_auto(mem):
            auto.setdefault((mem, rows, seq_len), (sp.knobs, rows, seq_len))
    check_graphs(cfg, graphs)
    make_windows = EVAL_WINDOWS[cfg.eval.windows]
    eval_sets = {n: window_batches(make_windows(val_ds, n, cfg.eval.max_tokens)) for n in eval_lens}
    warnings = corpus_warnings(read_meta(prepared), budget_tokens=schedule.total_tokens, sampler=cfg.data.sampler)
    return RunData(schedule, sampler, eval_sets, graphs, train_ds, val_ds, train_ds.eot_id, list(auto.values()), shapes,
                   step_knobs, warnings)
