"""The OLMo-core arms of benchmarks/peers.py: OLMo-core 3.0.0's own trainer, transformer, data loader and
variable-sequence-length dataset, in one process on CPU (gloo, world size 1), SDPA, fp32, no compile.

- ``olmo_vsl``: ``NumpyVSLDataset`` with ``VSLGrowP2Curriculum`` (dataset decomposition, Grow-P2 odds);
- ``olmo_fsl``: ``NumpyFSLDataset``, the stream cut into L-token instances (cross-document attention).

Documents are read from a headerless uint16 token file (OLMo-core's format: ``np.memmap``, every document
ending with EOS, no BOS). An OLMo-core instance of 2^k tokens holds 2^k - 1 targets (labels are shifted
inside it); rampup's sequences of 2^k + 1 tokens hold 2^k. OLMo-core's Grow-P2 cycles span one epoch of
its file (rampup's span the run), and its first batch comes from the longest bucket on purpose.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from olmo_core.data import DataCollator
from olmo_core.data.data_loader import NumpyDataLoaderConfig
from olmo_core.data.numpy_dataset import NumpyFSLDataset, NumpyVSLDataset, VSLGrowP2Curriculum
from olmo_core.nn.attention.backend import AttentionBackendName
from olmo_core.nn.transformer import TransformerConfig
from olmo_core.optim import AdamWConfig, CosWithWarmup
from olmo_core.train import Duration, TrainerConfig
from olmo_core.train.callbacks import Callback
from olmo_core.train.train_module import TransformerTrainModuleConfig

from integrations import run_record  # benchmarks/integrations.py


def write_documents(path: Path, shards: list[np.ndarray]) -> int:
    """rampup's token shards (each document already ends with EOT) as one OLMo-core token file; tokens."""
    stream = np.concatenate([np.asarray(s, dtype=np.uint16) for s in shards])
    stream.tofile(path)
    return int(stream.size)


class Recorder(Callback):
    """Scores the live model at fixed steps (train clock paused) and times every step with its length."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], float], at: set[int], flops_of: Callable[[int], float]):
        super().__init__()
        self.evaluate, self.at, self.flops_of = evaluate, at, flops_of
        self.evals: list[tuple[int, float, float, float]] = []
        self.steps: list[tuple[int, int, float]] = []  # (seq_len, tokens, seconds)
        self.paused, self.flops = 0.0, 0.0

    def pre_train(self) -> None:
        self.t0 = time.perf_counter()

    def pre_load_batch(self) -> None:
        self.step_t0 = time.perf_counter()

    def pre_step(self, batch: dict[str, Any]) -> None:
        self.shape = tuple(batch["input_ids"].shape)

    def post_train_batch(self) -> None:
        rows, T = self.shape
        self.steps.append((T, rows * T, time.perf_counter() - self.step_t0))
        self.flops += rows * T * self.flops_of(T)
        step = self.trainer.global_step
        if step in self.at:
            t = time.perf_counter()
            model = self.trainer.train_module.model
            loss = self.evaluate(model)
            train_time = t - self.t0 - self.paused
            self.evals.append((int(self.trainer.global_train_tokens_seen), train_time, self.flops, loss))
            print(f"    step {step}: {self.trainer.global_train_tokens_seen} tok, {train_time:.1f}s, loss {loss:.4f}")
            self.paused += time.perf_counter() - t


ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A gloo process group of one for OLMo-core's trainer, torn down after it: left behind, it would make
    the Hugging Face Trainer (through accelerate) wrap the next arm's model in DDP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(dict(zip(ENV, ("127.0.0.1", str(port), "0", "0", "1", "1"), strict=True)))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k in ENV:
            os.environ.pop(k, None)


def model(hf: dict[str, Any]) -> torch.nn.Module:
    """OLMo-core's Llama-like transformer in the shape of the benchmark's HF LlamaConfig (SwiGLU hidden
    352 = int(8 d / 3) rounded up to 32, tied embeddings, RoPE theta 10,000 as LlamaConfig's default)."""
    cfg = TransformerConfig.llama_like(
        d_model=hf["hidden_size"],
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"],
        hidden_size_multiple_of=32,
        rope_theta=10_000,
        attn_backend=AttentionBackendName.torch,
        tie_word_embeddings=hf["tie_word_embeddings"],
    )
    return cfg.build(init_device="cpu")


def dataset(arm: str, tokens: Path, eos: int, vocab: int, L: int, min_log2: int, cycles: int) -> Any:
    if arm == "olmo_vsl":
        return NumpyVSLDataset(
            tokens,
            pad_token_id=eos,
            eos_token_id=eos,
            vocab_size=vocab,
            max_sequence_length=L,
            min_sequence_length=1 << min_log2,
            curriculum=VSLGrowP2Curriculum(num_cycles=cycles, balanced=False),
            dtype=np.uint16,
        )
    return NumpyFSLDataset(
        tokens, sequence_length=L, pad_token_id=eos, eos_token_id=eos, vocab_size=vocab, dtype=np.uint16
    )


def epoch_tokens(arm: str, tokens: Path, eos: int, vocab: int, L: int, min_log2: int, cycles: int, batch: int) -> int:
    """Tokens one epoch of the arm's data loader serves (the VSL curriculum drops pieces and rounds batches)."""
    work = tokens.parent / f"epoch_{arm}"
    ds = dataset(arm, tokens, eos, vocab, L, min_log2, cycles)
    ds.work_dir = work
    loader = NumpyDataLoaderConfig(global_batch_size=batch, seed=0, work_dir=str(work), num_workers=0).build(
        ds, collator=DataCollator(pad_token_id=eos, vocab_size=vocab)
    )
    return int(loader.total_batches) * batch


def train(arm: str, **settings: Any) -> dict[str, Any]:
    """:func:`run` inside a process group of one that is gone afterwards, with Python's garbage collector as
    it was before (OLMo-core's trainer turns automatic collection off and collects every few steps itself;
    left off, the next arms would run without it too)."""
    collecting = gc.isenabled()  # its GarbageCollectorCallback disables gc for the run and does not restore it
    try:
        with process_group():
            return run(arm, **settings)
    finally:
        if collecting:
            gc.enable()


def run(
    arm: str,
    *,
    tokens_file: Path,
    eos: int,
    hf: dict[str, Any],
    L: int,
    min_log2: int,
    cycles: int,
    budget: int,
    batch_tokens: int,
    lr: float,
    seed: int,
    evals: int,
    evaluate: Callable[[torch.nn.Module], float],
    flops_of: Callable[[int], float],
    out: Path,
) -> dict[str, Any]:
    """One OLMo-core run: AdamW (betas 0.9/0.95, weight decay 0.1 on every parameter: one group), 5%
    warmup, cosine to 0.1x, clipping 1.0, ``budget`` tokens of ``batch_tokens`` per step."""
    torch.manual_seed(seed)
    work = out / f"{arm}_s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    ds = dataset(arm, tokens_file, eos, hf["vocab_size"], L, min_log2, cycles)
    ds.work_dir = work
    loader = NumpyDataLoaderConfig(global_batch_size=batch_tokens, seed=seed, work_dir=str(work), num_workers=0).build(
        ds, collator=DataCollator(pad_token_id=eos, vocab_size=hf["vocab_size"])
    )
    net = model(hf)
    steps = budget // batch_tokens
    module = TransformerTrainModuleConfig(
        rank_microbatch_size=batch_tokens,
        max_sequence_length=L,
        optim=AdamWConfig(lr=lr, betas=(0.9, 0.95), weight_decay=0.1),
        scheduler=CosWithWarmup(warmup=max(1, round(0.05 * steps)), alpha_f=0.1),
        max_grad_norm=1.0,
        compile_model=False,
    ).build(net, device=torch.device("cpu"))
    rec = Recorder(evaluate, {round(steps * (i + 1) / evals) for i in range(evals)}, flops_of)
    trainer = TrainerConfig(
        save_folder=str(work / "save"),
        work_dir=str(work),
        device="cpu",
        save_overwrite=True,
        max_duration=Duration.tokens(budget),
        metrics_collect_interval=10,
        no_checkpoints=True,
        no_evals=True,
        cancel_check_interval=10_000,
        callbacks={"rampup_recorder": rec},
    ).build(module, loader)
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    return run_record(arm, seed, rec.evals, wall, steps=rec.steps[1:])  # the first step (start-up) left out
