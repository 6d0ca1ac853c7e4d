"""Random draws that shape training, each from its own generator: (run seed, purpose, step).

Nothing that shapes a run reads torch's global generator, whose state at any moment depends on what
the process did before (building a teacher's model to load weights into, planning, a resume that
skipped work): new blocks of a depth growth, the symmetry-breaking noise of a widening, a step's
sub-network, a learned projection's initialisation each get a generator derived from the run's seed,
what the draw is for and the step where it applies, so an uninterrupted run and a run resumed from
any checkpoint draw the same numbers. (The data order is drawn the same way, by numpy generators seeded
with the seed and the epoch, in rampup.data.samplers.) A model built only to have weights loaded into
it is built under :func:`untouched_rng`, so that it draws nothing from the global generator either.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor


def derived_seed(seed: int, purpose: str, step: int = 0) -> int:
    """A 63-bit seed for ``purpose`` at ``step`` of the run seeded ``seed``: the same in every process and
    on every rank (a hash, not Python's salted ``hash``); different purposes and steps are unrelated."""
    digest = hashlib.blake2b(f"{int(seed)}|{purpose}|{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, purpose: str, step: int = 0) -> torch.Generator:
    """A CPU torch generator for ``purpose`` at ``step`` (draw on the CPU, then move: the numbers are the
    same whatever the device)."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, step))


def py_random(seed: int, purpose: str, step: int = 0) -> random.Random:
    return random.Random(derived_seed(seed, purpose, step))


@torch.no_grad()
def normal_(t: torch.Tensor, std: float, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    """Fill ``t`` in place with N(mean, std^2) drawn on the CPU from ``gen``; a fake or meta tensor (a plan,
    a memory estimate) only consumes nothing and keeps its metadata."""
    if t.device.type == "meta" or _is_fake(t):
        return t
    t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std).add_(mean))
    return t


def _is_fake(t: torch.Tensor) -> bool:

    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def untouched_rng(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block without moving torch's global generators (the CPU one, and the device's): for building
    a model whose weights are about to be replaced (a teacher, a snapshot, a checkpoint's replica)."""
    dev = torch.device(device)
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield
