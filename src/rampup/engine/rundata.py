"""The data seam (:class:`RunData`) and :func:`prepare_run`: everything a run reads, checked
before any compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rampup.data.bucket_sampler import check_context, plan_buckets
from rampup.data.buckets import get_buckets
from rampup.data.dataset import TokenDataset
from rampup.data.mixture import MixtureSampler, all_prepared, prepare_sources
from rampup.data.passkey import PasskeyTemplate
from rampup.data.prepare import (
    corpus_warnings,
    get_prepared,
    load_prepared_tokenizer,
    read_meta,
)
from rampup.data.samplers import EVAL_WINDOWS, sampler_for_run
from rampup.engine.evaluation import window_batches
from rampup.engine.tasks import CausalLM
from rampup.errors import ConfigError, DataError
from rampup.protocols import RunSettings
from rampup.schedule.registry import check_knobs, graph_id
from rampup.schedule.stages import Schedule


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
    step_shapes: list[tuple[int, int]] = field(default_factory=list)
    """(global rows, seq_len) of every training step, in order (the buckets sampler's draws, walked dry)."""
    shapes: set[tuple[int, int]] = field(default_factory=set)
    """Every distinct (global rows, seq_len) of a training step."""
    step_knobs: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    """The knobs of the first step of each distinct (global rows, seq_len): its memory is checked before any step."""
    warnings: list[str] = field(default_factory=list)
    """What the run prints as warnings at its start (a corpus mostly skipped, or repeated many times)."""
    eval_parts: dict[str, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=dict)
    """An evaluation set in named parts (a mixture's sources): each part's loss is recorded under its
    name, and the loss of ``eval_sets`` (all parts together) is their pooled mean. Empty: one set."""
    _passkey: PasskeyTemplate | None = field(default=None, repr=False)
    _stream: np.ndarray | None = field(default=None, repr=False)

    def passkey_template(self) -> PasskeyTemplate:
        """The passkey pieces for the run's tokenizer (built once)."""
        if self.train_ds is None:
            raise ConfigError("passkey examples need a token corpus and its tokenizer (data.source)")
        if self._passkey is None:
            self._passkey = PasskeyTemplate(load_prepared_tokenizer(self.train_ds.folder))
        return self._passkey

    def passkey_stream(self) -> np.ndarray:
        """The validation split as one token stream: passkey filler (built once)."""
        if self._stream is None:
            self._stream = np.concatenate([self.val_ds.doc(i) for i in range(self.val_ds.n_docs)])
        return self._stream


RunInputs = RunData  # the name before the data seam


def micro_shapes(rows: int, seq_len: int, micro_batch_tokens: int | None) -> set[tuple[int, int]]:
    per = rows if micro_batch_tokens is None else max(1, min(rows, micro_batch_tokens // seq_len))
    return {(per, seq_len)} | ({(rows % per, seq_len)} if rows % per else set())


def check_graphs(cfg: RunSettings, graphs: set[tuple]) -> None:
    if cfg.train.compile and len(graphs) > cfg.train.compile_max_graphs:
        raise ConfigError(
            f"train.compile: the run needs {len(graphs)} compiled graphs (distinct batch shapes, and knob "
            f"values such as window that change a graph), more than train.compile_max_graphs "
            f"({cfg.train.compile_max_graphs}); its distinct batch shapes and window widths each compile their "
            "own graph; bucket the lengths (data.sampler: buckets, a seq_len ramp: step, or a coarser "
            "multiple_of), step the window, raise compile_max_graphs, or turn compile off"
        )


def prepare_run(cfg: RunSettings) -> RunData:
    """Everything that can fail on bad input, done before any training compute."""
    folders = prepare_sources(cfg.data)  # {"main": folder} for one source
    verify = cfg.data.verify_checksums
    trains = {n: TokenDataset.open(f, "train", verify=verify) for n, f in folders.items()}
    vals = {n: TokenDataset.open(f, "val", verify=verify) for n, f in folders.items()}
    train_ds, val_ds = next(iter(trains.values())), next(iter(vals.values()))
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {train_ds.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size >= {train_ds.vocab_size}"
        )
    schedule = Schedule.build(
        cfg.schedule,
        total=cfg.train.duration,
        tokens_per_epoch=sum(d.n_tokens for d in trains.values()),
        shape=CausalLM.step_shape(cfg.schedule.seq_len_mode),
    )
    eval_lens = cfg.eval.seq_lens or [schedule.max_knob("seq_len")]
    if cfg.data.sources is None:
        sampler: Any = sampler_for_run(cfg.data, train_ds, cfg.train.seed, schedule)
    else:
        sampler = MixtureSampler(trains, cfg.data, cfg.train.seed, schedule)
    graphs: set[tuple] = set()
    step_knobs: dict[tuple[int, int], dict[str, Any]] = {}
    every = step_shapes(cfg, schedule, sampler)  # buckets or a mixture: the draws, walked dry
    for sp, (rows, seq_len) in zip(schedule.steps(), every, strict=True):
        graphs |= {graph_id(sp.knobs, s) for s in micro_shapes(rows, seq_len, cfg.train.micro_batch_tokens)}
        step_knobs.setdefault((rows, seq_len), sp.knobs)
    check_graphs(cfg, graphs)
    parts = _eval_parts(cfg, folders, vals, eval_lens)
    eval_sets = {n: [b for part in parts.values() for b in part[n]] for n in eval_lens}
    warnings = [
        w
        for folder in folders.values()
        for w in corpus_warnings(
            read_meta(folder),
            budget_tokens=schedule.total_tokens if cfg.data.sources is None else None,
            sampler=cfg.data.sampler,
        )
    ]
    if isinstance(sampler, MixtureSampler):
        warnings += sampler.warnings(schedule)
    return RunData(
        schedule,
        sampler,
        eval_sets,
        graphs,
        train_ds,
        val_ds,
        train_ds.eot_id,
        every,
        set(step_knobs),
        step_knobs,
        warnings,
        eval_parts=parts if cfg.data.sources is not None else {},
    )


def _eval_parts(
    cfg: RunSettings, folders: dict[str, Any], vals: dict[str, TokenDataset], eval_lens: list[int]
) -> dict[str, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """{source: {length: batches}} of every source's validation windows (one source: ``main``), each long
    enough; sources sharing a corpus share its held-out split, evaluated once under the first one's name."""
    for name, ds in vals.items():
        for n in eval_lens:
            if ds.n_tokens < n + 1:
                of = f" of source '{name}'" if cfg.data.sources is not None else ""
                raise DataError(
                    f"the validation split{of} has {ds.n_tokens} tokens, too few for eval at seq_len {n}; "
                    "raise data.val_fraction or lower eval.seq_lens"
                )
    make_windows = EVAL_WINDOWS[cfg.eval.windows]
    firsts = {f: n for n, f in reversed(folders.items())}
    return {
        name: {n: window_batches(make_windows(ds, n, cfg.eval.max_tokens)) for n in eval_lens}
        for name, ds in vals.items()
        if firsts[folders[name]] == name
    }


def step_shapes(cfg: RunSettings, schedule: Schedule, sampler: Any = None) -> list[tuple[int, int]]:
    """(rows, seq_len) of every step as the sampler will serve it.

    For the buckets sampler that needs the bucket counts (the corpus is prepared and decomposed if
    it is not yet) and walks the sampler's own draws dry, so a curriculum whose buckets run dry or
    whose odds do not fit the buckets fails here, before any compute; a mixture walks its sampler dry
    (``sampler``, or one built here), so a source that runs dry with repeat: false fails here too.
    """
    check_knobs(cfg, schedule)  # every knob's plan-time checks (windows within their sequences, ...)
    if cfg.data.sources is not None:
        if sampler is None:
            if cfg.data.sampler != "buckets" and not all_prepared(cfg.data):  # plan never prepares for shapes
                return [(sp.batch_size, sp.seq_len) for sp in schedule.steps()]
            folders = prepare_sources(cfg.data)
            trains = {n: TokenDataset.open(f, "train", verify=cfg.data.verify_checksums) for n, f in folders.items()}
            sampler = MixtureSampler(trains, cfg.data, cfg.train.seed, schedule)
        return [(rows, seq_len) for rows, seq_len, _ in sampler.walk(schedule)]
    if cfg.data.sampler != "buckets":
        return [(sp.batch_size, sp.seq_len) for sp in schedule.steps()]
    b = cfg.data.buckets
    check_context(int(schedule.max_knob("seq_len")), b.min_log2, b.max_log2)
    prepared = get_prepared(cfg.data)
    train_ds = TokenDataset.open(prepared, "train", verify=cfg.data.verify_checksums)
    counts = get_buckets(prepared, b.min_log2, b.max_log2, train_ds).counts()
    draws = plan_buckets(counts, schedule, seed=cfg.train.seed, cycles=b.cycles, repeat=b.repeat)
    return [(sp.knobs["batch_tokens"] >> k, 1 << k) for sp, k in zip(schedule.steps(), draws, strict=True)]
