"""Data mixtures: several corpora (``data.sources``) served by weight (the ``mix`` knob), resumably.

Each source is prepared into its own folder with one shared tokenizer (``data.tokenizer.path``, a
source's own ``tokenizer``, or a byte-level BPE trained once on the union of the sources' training
documents) and keeps its own validation split. :class:`MixtureSampler` wraps one sampler per source:
every step it splits the step's rows among the sources by the mix weights, carrying the rounding
across steps (cumulative largest remainder: each source's cumulative rows stay within one row of its
weights' target), draws each source's rows from its own sampler (without replacement within that
source's epoch) and shuffles the rows of the step. With the buckets sampler one length bucket is drawn
per step for the whole batch and each source serves its share of that bucket's sequences.

See docs/mixtures.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from rampup.data.bucket_sampler import BucketCurriculum, bucket_odds_weights, check_context
from rampup.data.buckets import BucketSet, get_buckets
from rampup.data.config import DataConfig
from rampup.data.corpus import BINARY_SNIFF, iter_documents, resolve_source
from rampup.data.dataset import TokenDataset
from rampup.data.prepare import (
    _VAL_BUCKETS,
    MAX_EPOCHS,
    TOKENIZER,
    _location,
    _val_bucket,
    prepare,
    prepared_dir,
    remove_stale_tmp,
)
from rampup.data.samplers import build_sampler
from rampup.data.tokenizer import load_tokenizer, same_tokenizer, train_tokenizer
from rampup.errors import ConfigError, DataError, did_you_mean

if TYPE_CHECKING:
    from rampup.protocols import Sampler
    from rampup.schedule import Schedule, StepPlan

_SUBSET_SEED = 0x5B5E7
"""Subset draws use a fixed seed (and the source's data), never the run's: every run over a source
trains on the same subset."""


# ----------------------------------------------------------------------------- preparing the sources
def _tokenizer_folder(data: DataConfig) -> Path:
    """Where the tokenizer trained on the union of the sources lives (keyed by every source's files)."""
    keys = {}
    for name, cfg in data.source_configs().items():
        files = resolve_source(cfg.source, cfg.max_files, cfg.split)
        settings = _location(cfg, files)[1]
        keys[name] = {k: v for k, v in settings.items() if k not in ("tokenizer", "shard_tokens")}
    keys["_vocab_size"] = data.tokenizer.vocab_size  # type: ignore[assignment]
    key = hashlib.blake2b(json.dumps(keys, sort_keys=True).encode(), digest_size=8).hexdigest()
    return Path(data.cache_dir).expanduser() / f"tokenizer-{key}"


def shared_tokenizer(data: DataConfig) -> Path:
    """The one tokenizer.json of a mixture: data.tokenizer.path, else the first source's own
    ``tokenizer``, else the union-trained one (its path, whether or not it is trained yet). Every source
    that names a tokenizer must name this one: checked here, before any data is read."""
    assert data.sources is not None
    named = {n: s.tokenizer for n, s in data.sources.items() if s.tokenizer is not None}
    if data.tokenizer.path is not None:
        shared, what = Path(data.tokenizer.path).expanduser(), "data.tokenizer.path"
    elif named:
        first = next(iter(named))
        shared, what = Path(named[first]).expanduser(), f"source '{first}'s tokenizer"
    else:
        return _tokenizer_folder(data) / TOKENIZER
    ref = load_tokenizer(shared)
    for name, path in named.items():
        if not same_tokenizer(load_tokenizer(path), ref):
            raise ConfigError(
                f"data.sources.{name}.tokenizer ({path}) differs from the mixture's tokenizer ({what}: {shared}); "
                "one tokenizer serves every source (their token ids must mean the same text): give the same "
                f"file, or remove data.sources.{name}.tokenizer"
            )
    return shared


def source_configs(data: DataConfig) -> dict[str, DataConfig]:
    """{name: one-source DataConfig}, each with the mixture's tokenizer (one ``main`` for data.source)."""
    configs = data.source_configs()
    if data.sources is None:
        return configs
    tok = str(shared_tokenizer(data))
    return {
        name: cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": tok})})
        for name, cfg in configs.items()
    }


def _train_union_tokenizer(data: DataConfig, path: Path) -> None:
    """Train the shared BPE on every source's training documents (validation held out as prepare does)."""
    threshold = round(data.val_fraction * _VAL_BUCKETS)

    def texts() -> Iterator[str]:
        for cfg in data.source_configs().values():
            files = resolve_source(cfg.source, cfg.max_files, cfg.split)
            for text in iter_documents(files, cfg.text_field, on_undecodable=cfg.on_undecodable):
                if _val_bucket(text) >= threshold:
                    yield text

    tok = train_tokenizer(texts(), data.tokenizer.vocab_size)
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent.parent)
    tmp = path.parent.parent / f".{path.parent.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tok.save(str(tmp / TOKENIZER))
        try:
            os.rename(tmp, path.parent)
        except OSError:
            if not path.is_file():  # not a concurrent prepare that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_sources(data: DataConfig, **how: Any) -> dict[str, Path]:
    """{name: prepared folder} of every source, prepared on first use (``how``: prepare's progress/force)."""
    if data.sources is not None:
        tok = shared_tokenizer(data)
        if not tok.is_file() and data.tokenizer.path is None:
            _train_union_tokenizer(data, tok)
    return {name: prepare(cfg, **how) for name, cfg in source_configs(data).items()}


def source_folders(data: DataConfig) -> dict[str, Path]:
    """{name: where each source's prepared folder is}, prepared or not (nothing is read or trained)."""
    return {name: prepared_dir(cfg) for name, cfg in source_configs(data).items()}


def first_folder(data: DataConfig, *, prepare: bool = False) -> Path:
    """The prepared folder that speaks for a run's data (its tokenizer, its validation text): the one
    source's, or a mixture's first source's (which holds the shared tokenizer); ``prepare``: prepare every
    source first."""
    folders = prepare_sources(data) if prepare else source_folders(data)
    return next(iter(folders.values()))


def all_prepared(data: DataConfig) -> bool:
    """Whether every source is prepared (a mixture's shared tokenizer trained too)."""
    if data.sources is not None and not shared_tokenizer(data).is_file():
        return False
    return all((f / "meta.json").is_file() for f in source_folders(data).values())


# ----------------------------------------------------------------------------- a fixed subset of a source
class SubsetDataset:
    """A fixed set of whole documents of a :class:`TokenDataset`, read as a TokenDataset is."""

    def __init__(self, base: TokenDataset, doc_ids: np.ndarray):
        self.base, self.doc_ids = base, np.asarray(doc_ids, dtype=np.int64)
        self.folder, self.split, self.meta = base.folder, base.split, base.meta
        self.shards, self.vocab_size, self.eot_id = base.shards, base.vocab_size, base.eot_id
        self.index = base.index[self.doc_ids]
        self.n_docs = len(self.doc_ids)
        self.doc_lengths = self.index[:, 2]
        self.n_tokens = int(self.doc_lengths.sum())

    @property
    def identity(self) -> str:
        h = hashlib.blake2b(self.doc_ids.tobytes(), digest_size=6).hexdigest()
        return f"{self.base.identity}:subset-{h}"

    def doc(self, i: int) -> np.ndarray:
        return self.base.doc(int(self.doc_ids[i]))

    def read_stream(self, order: np.ndarray, doc_pos: int, offset: int, n: int) -> tuple[np.ndarray, int, int]:
        return self.base.read_stream(self.doc_ids[order], doc_pos, offset, n)


def subset_documents(dataset: TokenDataset, tokens: int, name: str) -> np.ndarray:
    """Document ids of ``dataset`` in a fixed seeded order until they hold ``tokens`` tokens (sorted)."""
    if tokens >= dataset.n_tokens:
        raise ConfigError(
            f"data.sources.{name}.subset asks for {tokens:,} tokens but the source's training split holds "
            f"{dataset.n_tokens:,}; lower subset or remove it to train on the whole source"
        )
    order = np.random.default_rng([_SUBSET_SEED, dataset.n_docs]).permutation(dataset.n_docs)
    n = int(np.searchsorted(np.cumsum(dataset.doc_lengths[order]), tokens)) + 1
    return np.sort(order[:n])


def _restrict_buckets(buckets: BucketSet, dataset: SubsetDataset) -> BucketSet:
    """The bucket sequences that come from the subset's documents."""
    index = dataset.base.index
    keep = np.zeros(len(index), dtype=bool)
    keep[dataset.doc_ids] = True
    key = index[:, 0] * (1 << 40) + index[:, 1]  # (shard, start) of every document, as one sortable number
    order = np.argsort(key)
    starts = {}
    for k, arr in buckets.starts.items():
        if len(arr) == 0:
            starts[k] = arr
            continue
        pos = np.searchsorted(key[order], arr[:, 0] * (1 << 40) + arr[:, 1], side="right") - 1
        starts[k] = arr[keep[order[pos]]]
    return BucketSet(buckets.folder, buckets.dataset, buckets.min_log2, buckets.max_log2, starts, buckets.dropped)


# ----------------------------------------------------------------------------- the weights and the split
def mix_weights(mix: dict[str, float] | None, names: list[str], sizes: list[int]) -> np.ndarray:
    """(n_sources,) weights summing to 1: ``mix`` (a source it leaves out gets 0); empty: by size."""
    if not mix:
        w = np.array(sizes, dtype=np.float64)
    else:
        unknown = [k for k in mix if k not in names]
        if unknown:
            raise ConfigError(
                f"mix names the source '{unknown[0]}'{did_you_mean(unknown[0], names)}, which data.sources "
                f"does not define; sources: {', '.join(names)}"
            )
        w = np.array([float(mix.get(n, 0.0)) for n in names], dtype=np.float64)
    if (w < 0).any() or not w.sum() > 0:
        raise ConfigError(f"mix weights {dict(zip(names, w.tolist(), strict=True))} must be >= 0 with one > 0")
    return w / w.sum()


def split_rows(counts: list[int], target: list[float], weights: np.ndarray, rows: int) -> list[int]:
    """This step's rows per source, updating ``counts`` (cumulative rows) and ``target`` (cumulative
    weighted rows) in place: each source gets between its cumulative floor and ceiling, never fewer than
    it already has, the leftover going to the largest remainders (ties to the earlier source)."""
    n = len(counts)
    for i in range(n):
        target[i] += float(weights[i]) * rows
    total = sum(counts) + rows
    eps = 1e-9
    low = [max(counts[i], int(np.floor(target[i] + eps))) for i in range(n)]
    high = [max(low[i], int(np.ceil(target[i] - eps))) for i in range(n)]
    left = total - sum(low)
    new = list(low)
    for i in sorted(range(n), key=lambda i: (-(target[i] - low[i]), i)):
        if left <= 0:
            break
        if new[i] < high[i]:
            new[i] += 1
            left -= 1
    for i in sorted(range(n), key=lambda i: (-(target[i] - new[i]), i)):  # numerical slack only
        if left <= 0:
            break
        if weights[i] > 0:
            new[i] += 1
            left -= 1
    step = [new[i] - counts[i] for i in range(n)]
    counts[:] = new
    return step


# ----------------------------------------------------------------------------- the sampler
@dataclass
class _Source:
    name: str
    dataset: Any  # TokenDataset or SubsetDataset
    repeat: bool
    seed: int
    sampler: Any = None  # staged / fixed: the source's own sampler
    buckets: BucketSet | None = None
    cursor: dict[int, list[int]] | None = None  # buckets: k -> [epoch, position]
    _perm: dict[tuple[int, int], np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        if self.sampler is not None:
            return int(self.sampler.epoch)
        assert self.cursor is not None
        return max(e for e, _ in self.cursor.values())

    def order(self, epoch: int, k: int) -> np.ndarray:
        assert self.buckets is not None
        if self._perm is None or (epoch, k) not in self._perm:
            self._perm = {key: v for key, v in (self._perm or {}).items() if key[1] != k}
            n = len(self.buckets.starts[k])
            self._perm[epoch, k] = np.random.default_rng([self.seed, epoch, 1, k]).permutation(n)
        return self._perm[epoch, k]


def _source_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i, 0x313]).generate_state(1)[0])


class MixtureSampler:
    """Each step's rows split among the sources by the ``mix`` knob; see the module docstring."""

    kind = "mixture"

    def __init__(
        self,
        sources: dict[str, TokenDataset],
        data: DataConfig,
        seed: int,
        schedule: Schedule,
    ):
        assert data.sources is not None
        self.names = list(sources)
        self.seed, self.data = seed, data
        self.mode = data.sampler
        seq_len = int(schedule.max_knob("seq_len"))
        truncate = schedule.seq_len_mode == "truncate"
        default_repeat = data.buckets.repeat if self.mode == "buckets" else True
        self.sources: list[_Source] = []
        for i, (name, full) in enumerate(sources.items()):
            spec = data.sources[name]
            ds: TokenDataset | SubsetDataset = full
            if spec.subset is not None:
                ds = SubsetDataset(full, subset_documents(full, int(spec.subset.value), name))
            repeat = default_repeat if spec.repeat is None else spec.repeat
            src = _Source(name, ds, repeat, _source_seed(seed, i))
            if self.mode == "buckets":
                b = data.buckets
                check_context(seq_len, b.min_log2, b.max_log2)
                base = ds.base if isinstance(ds, SubsetDataset) else ds
                src.buckets = get_buckets(base.folder, b.min_log2, b.max_log2, base)
                if isinstance(ds, SubsetDataset):
                    src.buckets = _restrict_buckets(src.buckets, ds)
                src.cursor = {k: [0, 0] for k in src.buckets.ks}
            else:
                src.sampler = build_sampler(
                    self.mode, cast(TokenDataset, ds), src.seed, seq_len, truncate=truncate
                )  # reads as one
            self.sources.append(src)
        self.sizes = [s.dataset.n_tokens for s in self.sources]
        self.curriculum: BucketCurriculum | None = None
        if self.mode == "buckets":
            combined: dict[int, int] = {}
            for s in self.sources:
                assert s.buckets is not None
                for k, n in s.buckets.counts().items():
                    combined[k] = combined.get(k, 0) + n
            self.curriculum = BucketCurriculum(
                combined, seed=seed, cycles=data.buckets.cycles, run_tokens=schedule.total_tokens, repeat=True
            )
        self.counts = [0] * len(self.sources)
        self.target = [0.0] * len(self.sources)
        self.steps = 0
        self.tokens = dict.fromkeys(self.names, 0)
        """Tokens served per source so far."""
        self.last: dict[str, int] = {}
        """Tokens per source of the last step."""
        self.tokens_served = 0
        self._walked: tuple[Any, list[tuple[int, int, dict[str, int]]]] | None = None

    @property
    def epoch(self) -> int:
        """Epochs begun, summed over the sources (it changes when any source starts a new one)."""
        return sum(s.epoch for s in self.sources)

    def epochs(self) -> dict[str, float]:
        """Epochs of each source served so far (tokens served / tokens the source holds)."""
        return {s.name: self.tokens[s.name] / max(1, s.dataset.n_tokens) for s in self.sources}

    # ------------------------------------------------------------------ drawing a step
    def _weights(self, sp: StepPlan) -> np.ndarray:
        return mix_weights(sp.knobs.get("mix"), self.names, self.sizes)

    def _staged_split(self, sp: StepPlan) -> list[int]:
        return split_rows(self.counts, self.target, self._weights(sp), sp.batch_size)

    def _check_dry(self, src: _Source, sp: StepPlan) -> None:
        """After a staged/fixed source served rows: a source with repeat false must still be in its first epoch
        (the fixed sampler moves to the next epoch as it serves the last window; that one still counts)."""
        sub = src.sampler
        past = sub.epoch > 1 or (sub.epoch == 1 and (sub.kind != "fixed" or sub.pos > 0))
        if past and not src.repeat:
            self._dry(src, sp)

    def _dry(self, src: _Source, sp: StepPlan, k: int | None = None) -> None:
        where = f"bucket {1 << k} " if k is not None else ""
        raise DataError(
            f"source '{src.name}' ran dry at step {sp.step + 1}: the run needs more of its {where}sequences than "
            f"its {src.dataset.n_tokens:,} training tokens hold, and data.sources.{src.name}.repeat is false; "
            f"lower its weight in the mix, shorten train.duration, or set data.sources.{src.name}.repeat: true"
        )

    def _bucket_mask(self, weights: np.ndarray, batch_tokens: int) -> tuple[np.ndarray, dict[int, list[int]]]:
        """Which buckets every source with rows in the step can serve, and each bucket's tentative split."""
        assert self.curriculum is not None
        mask = np.zeros(len(self.curriculum.ks), dtype=bool)
        splits: dict[int, list[int]] = {}
        for j, k in enumerate(self.curriculum.ks):
            rows = split_rows(list(self.counts), list(self.target), weights, batch_tokens >> k)
            splits[k] = rows
            ok = True
            for src, n in zip(self.sources, rows, strict=True):
                assert src.buckets is not None and src.cursor is not None
                have = len(src.buckets.starts[k])
                fits_now = src.cursor[k][1] + n <= have
                ok &= n == 0 or fits_now or (src.repeat and n <= have)
            mask[j] = ok
        return mask, splits

    def _bucket_draw(self, sp: StepPlan) -> tuple[int, list[tuple[int, int, int]]]:
        """(k, [(epoch, first, n) per source]) of this step, every cursor advanced."""
        assert self.curriculum is not None
        weights, bt = self._weights(sp), int(sp.knobs["batch_tokens"])
        mask, splits = self._bucket_mask(weights, bt)
        if not mask.any():
            short = [
                s
                for s, w in zip(self.sources, weights, strict=True)
                if w > 0 and not s.repeat and s.buckets is not None
            ]
            if short:
                self._dry(short[0], sp)
            raise DataError(
                f"at step {sp.step + 1} no length bucket can serve the mixture's batch of {bt} tokens: some source "
                "with weight in the mix holds too few sequences of every bucket; lower batch_tokens, give that "
                "source less weight, or widen data.buckets.min_log2/max_log2"
            )
        odds = bucket_odds_weights(sp.knobs["bucket_odds"], len(self.curriculum.ks))
        if not (mask & (odds > 0)).any():
            raise DataError(
                f"at step {sp.step + 1} the buckets the mixture's sources can serve all have zero bucket_odds; "
                "give those buckets odds or lower batch_tokens"
            )
        k, _, _ = self.curriculum.choose(bt, sp.knobs["bucket_odds"], mask)
        rows = split_rows(self.counts, self.target, weights, bt >> k)
        assert rows == splits[k]
        out = []
        for src, n in zip(self.sources, rows, strict=True):
            assert src.buckets is not None and src.cursor is not None
            epoch, pos = src.cursor[k]
            if n and pos + n > len(src.buckets.starts[k]):  # this bucket of this source starts a new epoch
                epoch, pos = epoch + 1, 0
            src.cursor[k] = [epoch, pos + n]
            out.append((epoch, pos, n))
        return k, out

    def take(self, sp: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's (x, y): each source's rows, shuffled together."""
        parts: list[torch.Tensor] = []
        if self.mode == "buckets":
            k, draws = self._bucket_draw(sp)
            for src, (epoch, first, n) in zip(self.sources, draws, strict=True):
                if n:
                    assert src.buckets is not None
                    parts.append(torch.from_numpy(src.buckets.rows(k, src.order(epoch, k)[first : first + n])))
            per_row = {s.name: d[2] << k for s, d in zip(self.sources, draws, strict=True)}
        else:
            rows = self._staged_split(sp)
            for src, n in zip(self.sources, rows, strict=True):
                if n:
                    x, y = src.sampler.next_batch(sp.seq_len, n)
                    self._check_dry(src, sp)
                    parts.append(torch.cat([x, y[:, -1:]], dim=1))
            per_row = {s.name: n * sp.seq_len for s, n in zip(self.sources, rows, strict=True)}
        t = torch.cat(parts)  # (B, T + 1)
        t = t[torch.from_numpy(np.random.default_rng([self.seed, 0x313, self.steps]).permutation(len(t)))]
        self._count(per_row)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def skip(self, sp: StepPlan) -> tuple[int, int, dict[str, int]]:
        """Advance as :meth:`take` would without reading a token: (rows, seq_len, {source: tokens})."""
        if self.mode == "buckets":
            k, draws = self._bucket_draw(sp)
            per = {s.name: d[2] << k for s, d in zip(self.sources, draws, strict=True)}
            self._count(per)
            return int(sp.knobs["batch_tokens"]) >> k, 1 << k, per
        rows = self._staged_split(sp)
        for src, n in zip(self.sources, rows, strict=True):
            if n:
                src.sampler.skip(sp.seq_len, n)
                self._check_dry(src, sp)
        per = {s.name: n * sp.seq_len for s, n in zip(self.sources, rows, strict=True)}
        self._count(per)
        return sp.batch_size, sp.seq_len, per

    def _count(self, per: dict[str, int]) -> None:
        self.last = per
        for name, n in per.items():
            self.tokens[name] += n
        self.tokens_served += sum(per.values())
        self.steps += 1

    def walk(self, schedule: Schedule) -> list[tuple[int, int, dict[str, int]]]:
        """(rows, seq_len, {source: tokens}) of every step, walked dry on a copy (no token reads); raises
        what the run would hit (a source with repeat: false running dry, no bucket able to serve)."""
        if self._walked is None or self._walked[0] is not schedule:
            self._walked = (schedule, self._walk(schedule))
        return self._walked[1]

    def warnings(self, schedule: Schedule) -> list[str]:
        """A source (not a subset, which is meant to repeat) trained for more epochs than MAX_EPOCHS."""
        assert self.data.sources is not None
        used = dict.fromkeys(self.names, 0)
        for _, _, per in self.walk(schedule):
            for name, n in per.items():
                used[name] += n
        return [
            f"source '{s.name}' is served {used[s.name] / s.dataset.n_tokens:.0f} epochs of its "
            f"{s.dataset.n_tokens:,} training tokens (over {MAX_EPOCHS} repeats a model mostly memorises); "
            "give it less weight, more data, or mark it a subset (data.sources.NAME.subset) if that is the intent"
            for s in self.sources
            if self.data.sources[s.name].subset is None and used[s.name] > MAX_EPOCHS * s.dataset.n_tokens
        ]

    def _walk(self, schedule: Schedule) -> list[tuple[int, int, dict[str, int]]]:
        dry = copy.copy(self)
        dry.sources = [copy.copy(s) for s in self.sources]
        for s in dry.sources:
            s.sampler = copy.copy(s.sampler) if s.sampler is not None else None
            s.cursor = {k: list(v) for k, v in s.cursor.items()} if s.cursor is not None else None
        dry.curriculum = copy.deepcopy(self.curriculum)
        dry.counts, dry.target, dry.tokens = list(self.counts), list(self.target), dict(self.tokens)
        return [dry.skip(sp) for sp in schedule.steps()]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "seed": self.seed,
            "names": self.names,
            "counts": list(self.counts),
            "target": list(self.target),
            "steps": self.steps,
            "tokens": dict(self.tokens),
            "tokens_served": self.tokens_served,
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
            "sources": {
                s.name: {
                    "data_id": s.dataset.identity,
                    "sampler": s.sampler.state_dict() if s.sampler is not None else None,
                    "cursor": {str(k): v for k, v in (s.cursor or {}).items()},
                }
                for s in self.sources
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or state.get("mode") != self.mode:
            raise ConfigError(
                f"sampler state is for a '{state.get('kind')}' sampler ({state.get('mode')}), not a mixture of "
                f"'{self.mode}' samplers; resume with the data section the run was started with"
            )
        if state["names"] != self.names:
            raise ConfigError(
                f"the checkpoint's mixture has sources {state['names']}, this run {self.names}; resume with the "
                "data.sources the run was started with"
            )
        for s in self.sources:
            saved = state["sources"][s.name]
            if saved["data_id"] != s.dataset.identity:
                raise DataError(
                    f"source '{s.name}' changed since the run started (data id {saved['data_id']} then, "
                    f"{s.dataset.identity} now); a resume continues only on the data it started with: restore "
                    "its files, or start a new run from this one's weights with train.init_from: RUN_DIR"
                )
            if s.sampler is not None:
                s.sampler.load_state_dict(saved["sampler"])
            else:
                s.cursor = {int(k): list(v) for k, v in saved["cursor"].items()}
                s._perm = None
        if self.curriculum is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        self.seed = int(state["seed"])
        self.counts = [int(c) for c in state["counts"]]
        self.target = [float(t) for t in state["target"]]
        self.steps = int(state["steps"])
        self.tokens = {k: int(v) for k, v in state["tokens"].items()}
        self.tokens_served = int(state["tokens_served"])


def mixture_sampler(sources: dict[str, Path], data: DataConfig, seed: int, schedule: Schedule) -> Sampler:
    """The run's MixtureSampler over the prepared ``sources`` ({name: folder})."""
    datasets = {n: TokenDataset.open(p, "train", verify=data.verify_checksums) for n, p in sources.items()}
    return MixtureSampler(datasets, data, seed, schedule)


# ----------------------------------------------------------------------------- what plan shows
@dataclass
class SourcePlan:
    """Tokens each source gives each stage, and the tokens it holds (None: not prepared yet, then
    ``readable`` bytes bound them from above: a byte-level token is at least one byte)."""

    names: list[str]
    stage_tokens: list[dict[str, int]]
    held: dict[str, int | None]
    readable: dict[str, int]
    subset: dict[str, bool]

    def epochs(self, stage: int, name: str) -> float | None:
        held = self.held[name]
        return None if held is None else self.stage_tokens[stage][name] / max(1, held)

    def total(self, name: str) -> int:
        return sum(t[name] for t in self.stage_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {
            name: {
                "held_tokens": self.held[name],
                "subset": self.subset[name],
                "stages": [
                    {"tokens": t[name], "epochs": self.epochs(i, name)} for i, t in enumerate(self.stage_tokens)
                ],
            }
            for name in self.names
        }


def _readable_bytes(cfg: DataConfig) -> int:
    total = 0
    for f in resolve_source(cfg.source, cfg.max_files, cfg.split):
        if f.suffix.lower() not in (".jsonl", ".parquet", ".arrow"):
            with f.open("rb") as fh:
                if b"\0" in fh.read(BINARY_SNIFF):
                    continue
        total += f.stat().st_size
    return total


def plan_sources(data: DataConfig, schedule: Schedule, seed: int) -> SourcePlan:
    """Each source's tokens per stage: the sampler's own draws walked dry when the sources are prepared
    (or the buckets sampler, which prepares them), else the split of each step's rows by the mix weights,
    with a source that must run dry (repeat: false and more tokens than its readable bytes) refused."""
    assert data.sources is not None
    names = list(data.sources)
    stage_tokens = [dict.fromkeys(names, 0) for _ in schedule.stages]
    subset = {n: s.subset is not None for n, s in data.sources.items()}
    configs = data.source_configs()
    readable = {n: _readable_bytes(c) for n, c in configs.items()}
    for n, s in data.sources.items():  # a subset holds at most its own tokens
        if s.subset is not None:
            readable[n] = min(readable[n], int(s.subset.value))
    if data.sampler == "buckets" or all_prepared(data):
        folders = prepare_sources(data)
        trains = {n: TokenDataset.open(f, "train", verify=False) for n, f in folders.items()}
        sampler = MixtureSampler(trains, data, seed, schedule)
        for sp, (_, _, per) in zip(schedule.steps(), sampler.walk(schedule), strict=True):
            for n, t in per.items():
                stage_tokens[sp.stage][n] += t
        held: dict[str, int | None] = {s.name: s.dataset.n_tokens for s in sampler.sources}
        return SourcePlan(names, stage_tokens, held, readable, subset)
    sizes = [readable[n] for n in names]
    counts, target = [0] * len(names), [0.0] * len(names)
    for sp in schedule.steps():
        rows = split_rows(counts, target, mix_weights(sp.knobs.get("mix"), names, sizes), sp.batch_size)
        for n, r in zip(names, rows, strict=True):
            stage_tokens[sp.stage][n] += r * sp.seq_len
    default_repeat = True
    for n, s in data.sources.items():
        need = sum(t[n] for t in stage_tokens)
        bound = readable[n]
        if not (default_repeat if s.repeat is None else s.repeat) and need > bound:
            raise DataError(
                f"source '{n}' runs dry: the run needs {need:,} of its tokens but it holds at most {bound:,} "
                f"({'its subset' if s.subset is not None else 'one token per readable byte'}), and "
                f"data.sources.{n}.repeat is false; lower its weight in the mix, shorten train.duration, or "
                f"set data.sources.{n}.repeat: true"
            )
    return SourcePlan(names, stage_tokens, dict.fromkeys(names), readable, subset)
