"""Scale-out through PyTorch's own engine: torchrun launches, torch.distributed communicates, and
DistributedDataParallel (``train.strategy: ddp``) or FSDP2 (``fsdp``: ``fully_shard``, one unit per block,
on a 1-D DeviceMesh) holds the model.

Invariants: the same run at any world size (every rank draws the same global batch, so the same shape,
and trains on its own contiguous rows; tokens per step, schedule, sampler state and checkpoints do not
depend on the world size). DDP registers only trainable parameters when it wraps, so the wrapper is
rebuilt whenever the trainable set or the architecture changes; parameters outside the model
(distillation projections) are averaged after backward. One voice: the loss is averaged over ranks
before it is judged, so all ranks skip, apply or stop at the same step, and only rank 0 writes records
and checkpoint metadata. Checkpoints are DCP shards keyed by parameter name
(rampup.engine.checkpoint.sharded), so N ranks resume on M. FSDP2 refuses Hugging Face models, growth
and sub-networks by name. See docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run
from torch.nn.parallel import DistributedDataParallel as DDP

from rampup.engine.checkpoint.local import ShardedCheckpointer
from rampup.engine.checkpoint.sharded import all_trainable as _all_trainable  # noqa: F401
from rampup.engine.checkpoint.sharded import (
    full_state as full_state,  # re-exported: its import path before the layout
)
from rampup.engine.checkpoint.sharded import (
    set_full_state as set_full_state,  # re-exported: likewise
)
from rampup.engine.optim import build_optimizer
from rampup.errors import ConfigError, DistributedError, RampupError
from rampup.models.build import build_adapter
from rampup.protocols import ModelAdapter
from rampup.schedule.registry import knob_keys_set, parameter_groups


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    timeout: float = 0.0
    strategy: str = "ddp"
    ddp: Any = None
    """The DistributedDataParallel wrapper of the model's training forward (None: one process)."""
    _signature: tuple = field(default=(), repr=False)
    _plain_hidden: Any = field(default=None, repr=False)
    _adapter: Any = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

    # ----------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, then on the other ranks (what rank 0 writes or checks, they read)."""
        if not self.main:
            self.barrier()
        out = fn()
        if self.main:
            self.barrier()
        return out

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a 0-d tensor over ranks."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world

    # ----------------------------------------------------------------- the batch
    def shard_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows of a global batch (checked divisible at start)."""
        if not self.enabled:
            return x
        b = x.shape[0] // self.world
        return x[self.rank * b : (self.rank + 1) * b]

    def check_rows(self, shapes: list[tuple[int, int]], batch_tokens_hint: str = "") -> None:
        """A step whose global rows do not split evenly over the ranks is an error before compute."""
        if not self.enabled:
            return
        bad = sorted({(r, t) for r, t in shapes if r % self.world})
        if bad:
            r, t = bad[0]
            raise ConfigError(
                f"world size {self.world} does not divide the global batch: steps of {r} rows x {t} "
                f"tokens cannot be split evenly over the ranks{batch_tokens_hint}; choose a world "
                f"size dividing every step's rows, or a batch_tokens giving a multiple of {self.world} "
                "rows at every length"
            )

    # ----------------------------------------------------------------- the model
    def wrap(self, adapter: Any, extra_params: Callable[[], list[torch.nn.Parameter]] = list) -> None:
        """(Re)build the DDP wrapper of the adapter's training forward when the trainable parameters or
        their shapes changed since the last call (cheap otherwise)."""
        if not self.enabled or self.fsdp:  # FSDP2's hooks reduce-scatter the gradients themselves
            return
        module = adapter.module
        signature = tuple((id(p), tuple(p.shape)) for p in module.parameters() if p.requires_grad)
        if signature == self._signature:
            return

        if self._plain_hidden is None:
            self._plain_hidden = adapter._hidden
        device_ids = [self.local_rank] if next(module.parameters()).device.type == "cuda" else None
        # a language model's buffers are RoPE tables every rank computes itself: no sync in forward; batch
        # norms' running statistics are rank 0's on every rank, synced in each forward (DDP's default)
        sync = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
        buffers: dict[str, Any] = (  # the keyword this torch version knows
            {"forward_sync_buffers": sync}
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": sync}
        )
        self.ddp = DDP(
            _Forward(module, self._plain_hidden), device_ids=device_ids, init_sync=self._signature == (), **buffers
        )
        adapter._hidden = self.ddp
        self._adapter, self._signature = adapter, signature

    @contextlib.contextmanager
    def no_sync(self, last: bool) -> Iterator[None]:
        """Inside a micro-batch that is not the step's last: no gradient all-reduce yet."""
        if self.ddp is None or last:
            yield
            return
        with self.ddp.no_sync():
            yield

    def shard(self, adapter: Any, device: torch.device) -> None:
        """FSDP2: every block one unit, the rest the root's; the training forward goes through the
        root's hooks (``forward_hidden`` registered as an FSDP forward method)."""
        if not self.fsdp:
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # ~1 s: only when sharding

        n = sum(p.numel() for p in adapter.module.parameters())
        if self.main and 16 * n < SMALL_FOR_FSDP:
            print(
                f"warning: train.strategy fsdp shards a model of {n:,} parameters ({16 * n / 2**20:.1f} MiB with "
                f"gradients and AdamW state) over {self.world} ranks: it saves little memory and adds an "
                "all-gather per block; train.strategy: ddp is faster for a model this small",
                file=sys.stderr,
                flush=True,
            )
        mesh = init_device_mesh(device.type, (self.world,))
        for _, block in adapter.blocks():
            fully_shard(block, mesh=mesh)
        fully_shard(adapter.module, mesh=mesh)
        register_fsdp_forward_method(adapter.module, "forward_hidden")
        adapter._hidden = adapter.module.forward_hidden

    def checkpointer(self, local: Any, cfg: Any) -> Any:
        """The run's checkpointer: ``local`` (the single-process format) for one process, else the
        sharded one (torch.distributed.checkpoint: every rank writes its shards), which under FSDP2 reads
        a single-process checkpoint through an unsharded replica (built without moving the run's RNG)."""
        if not self.enabled and cfg.train.checkpoint_format != "dcp":
            return local

        if not self.fsdp:
            return ShardedCheckpointer(local, self)

        def replica() -> tuple[ModelAdapter, torch.optim.Optimizer]:
            with torch.random.fork_rng(devices=[]):
                a = build_adapter(cfg.model, "cpu")
            return a, build_optimizer(a.module, cfg.optimizer, parameter_groups(cfg))

        return ShardedCheckpointer(local, self, replica)

    def union(self, items: list[str]) -> list[str]:
        """Every rank's ``items``, rank 0's first (the same list on every rank)."""
        if not self.enabled:
            return list(items)
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def first_error(self, error: str | None) -> str | None:
        """The lowest failing rank's error, named, on every rank (None if no rank failed)."""
        if not self.enabled:
            return error
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, error)
        return next((f"rank {r}: {e}" for r, e in enumerate(out) if e is not None), None)

    def sync_outside(self, params: list[torch.nn.Parameter], module: torch.nn.Module) -> None:
        """Average the gradients of trained parameters DDP does not hold (distillation projections)."""
        if not self.enabled:
            return
        inside = {id(p) for p in module.parameters()}
        for p in params:
            if id(p) not in inside and p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    @contextlib.contextmanager
    def named_failures(self) -> Iterator[None]:
        """A collective that fails or times out (another rank hung or died) becomes an error naming this
        rank and the timeout, instead of a backend traceback."""
        if not self.enabled:
            yield
            return
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            words = ("gloo", "nccl", "timed out", "timeout", "connection", "collective", "peer")
            if isinstance(e, RampupError) or not (
                isinstance(e, dist.DistError) or any(w in str(e).lower() for w in words)
            ):
                raise
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world}: a collective with the other ranks failed ({first}); "
                f"{self._behind()} (longer than train.collective_timeout, {self.timeout:g} s) or died. "
                "torchrun's --max-restarts restarts the job from the latest checkpoint"
            ) from e

    def heartbeat(self, step: int) -> None:
        """Note in the job's store the step this rank is starting (read when a collective fails)."""
        if self.enabled:
            with contextlib.suppress(Exception):
                dist.distributed_c10d._get_default_store().set(f"rampup/step/{self.rank}", str(step))

    def _behind(self) -> str:
        """Which ranks are behind the others (the hung ones), from the heartbeats."""
        try:
            store = dist.distributed_c10d._get_default_store()
            keys = [f"rampup/step/{r}" for r in range(self.world)]
            steps = {r: int(store.get(k)) for r, k in enumerate(keys) if store.check([k])}
        except Exception:  # the store went with the failing rank
            return "another rank hung"
        if not steps or len(set(steps.values())) == 1:
            return "another rank hung"
        top = max(steps.values())
        late = sorted(r for r, s in steps.items() if s < top)
        return (
            f"rank {', '.join(map(str, late))} hung in step {min(steps[r] for r in late)} while rank "
            f"{self.rank} reached step {steps.get(self.rank, top)}"
        )

    def close(self) -> None:
        """Leave the job: every rank together, after the DDP wrapper (and its reducer threads) is gone."""
        if self._adapter is not None:
            self._adapter._hidden = self._plain_hidden
        self.ddp = self._adapter = None
        if self.enabled and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


class _Forward(torch.nn.Module):
    """The model's training forward (hidden states) as a module DDP can wrap; its parameters are the
    model's own."""

    def __init__(self, module: torch.nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.inner = module
        self._fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


SMALL_FOR_FSDP = 256 * 2**20
"""Bytes of parameters, gradients and AdamW state below which sharding is not worth it (a warning)."""

_FSDP_NOT_YET = {"depth": 0, "width": 0, "mlp_width": 0, "subnet": "none"}


def check_context_parallel(cfg: Any, world: int) -> None:
    """``train.context_parallel`` above 1, refused by name with what stands in the way (before compute)."""

    n = cfg.train.context_parallel
    if n == 1:
        return
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    sched = cfg.schedule
    windowed = "window" in knob_keys_set(sched) and any(
        v not in (None, 0) for v in [sched.knobs.get("window")] + [st.knobs.get("window") for st in sched.stages]
    )
    if not cuda:
        why = (
            "it needs CUDA GPUs: PyTorch's ring attention (torch.distributed.tensor.experimental.context_parallel) "
            "shards SDPA's CUDA flash and memory-efficient kernels, and the CPU kernel "
            "(aten._scaled_dot_product_flash_attention_for_cpu) has no sharding strategy"
        )
    elif cfg.data.doc_mask:
        why = "ring attention runs causal SDPA without a mask, so document masks (data.doc_mask) cannot be split"
    elif windowed:
        why = "the banded window kernel (knob 'window') is not SDPA's causal attention, which ring attention splits"
    elif world % n:
        why = f"the world size {world} is not a multiple of it"
    else:
        why = "rampup has not wired it yet (no GPUs to test ring attention on)"
    raise ConfigError(
        f"train.context_parallel {n}: {why}; set train.context_parallel: 1 (the long-context "
        "alternatives here: the memory knobs loss_shards, mlp_shards and activation_checkpoint)"
    )


def check_fsdp(cfg: Any) -> None:
    """What FSDP2 does not run yet, refused by name before compute."""

    if cfg.model.source != "reference":
        raise ConfigError(
            "train.strategy fsdp shards rampup's reference model only so far; use train.strategy: ddp "
            "for Hugging Face models"
        )
    sched = cfg.schedule
    for name in sorted(knob_keys_set(sched) & set(_FSDP_NOT_YET)):
        values = [sched.knobs.get(name)] + [st.knobs.get(name) for st in sched.stages]
        if any(v not in (None, _FSDP_NOT_YET[name]) for v in values):
            raise ConfigError(
                f"knob '{name}' with train.strategy fsdp is not built yet (growth and sub-networks "
                "change the sharded model's structure); use train.strategy: ddp"
            )


def from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup(cfg: Any) -> Dist:
    """Join the job torchrun started (a no-op for one process): the backend, the device, the timeout."""
    rank, world, local = from_env()
    strategy, backend = cfg.train.strategy, cfg.train.backend
    check_context_parallel(cfg, world)
    if world == 1:
        return Dist()
    if strategy == "fsdp":
        check_fsdp(cfg)
    if cfg.train.compile:
        raise ConfigError("train.compile with more than one process is not built yet; set train.compile: false")
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "train.backend nccl needs CUDA GPUs, and this machine has none; use train.backend: gloo "
            "(or auto) for CPU processes"
        )
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs; start at "
                "most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.train.collective_timeout)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun's agent keeps one store across restarts: without a prefix per attempt, a restarted
        # rank can read the address a dead rank of the previous attempt published, and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"rampup/attempt_{attempt}", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
        )
    return Dist(rank, world, local, backend, cfg.train.collective_timeout, strategy=strategy)


def device_for(d: Dist, device: torch.device) -> torch.device:
    """On CUDA each process takes the GPU of its LOCAL_RANK."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def launch(argv: list[str], nproc: int, max_restarts: int) -> int:
    """``rampup train CONFIG --nproc N``: run torchrun's launcher in this process (standalone rendezvous),
    which starts N processes of ``python -m rampup`` with the same arguments.

    A signal to this process reaches the workers (rank 0 checkpoints and says so, once) and the launcher
    exits as one process would: 128+N, no torchrun traceback. A failed worker has already printed its
    own error; the launcher exits with that worker's code (the lowest failing rank's)."""
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", "-m", "rampup", *argv]
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its shutdown notes: the workers speak
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        run(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank = min(e.failures)
        code = e.failures[rank].exitcode
        return code if code > 0 else 128 - code  # a worker killed by signal N reads -N
    return 0
