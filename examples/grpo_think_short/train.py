"""GRPO on a toy verifiable task (two-number addition) with a completion budget that decays over training.

    python examples/grpo_think_short/train.py --steps 40 --out runs/grpo_think_short

A tiny Llama is built from a config with a character-level tokenizer (nothing downloads); TRL's
GRPOTrainer samples completions for prompts such as ``17+25=`` and rewards the exact sum. The schedule
(``schedule.yaml`` beside this file) ramps the ``completion_budget`` knob, and
``rampup.integrations.trl.CompletionBudget`` writes each step's budget into the trainer's generation
settings. Each step's budget and the longest completion generated print at the end (and go to
``budget.json``). Needs ``pip install 'rampup[trl]'``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import datasets
import torch
import transformers
import trl
from tokenizers import Tokenizer, decoders, models

from rampup.integrations.curriculum import Curriculum
from rampup.integrations.trl import CompletionBudget

HERE = Path(__file__).parent
SPECIALS = ["<s>", "</s>", "<pad>"]
CHARS = "0123456789+= "


def tiny_llama(seed: int = 0) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerFast]:
    """A two-layer Llama over a character vocabulary (digits, '+', '=', space and three specials)."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg), fast


def addition_prompts(n: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    pairs = [(rng.randrange(50), rng.randrange(50)) for _ in range(n)]
    return datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [a + b for a, b in pairs]})


class Recorder:
    """The reward: 1 for a completion that starts with the exact sum. Records each step's completion lengths."""

    __name__ = "exact_sum"

    def __init__(self) -> None:
        self.trainer: trl.GRPOTrainer | None = None
        self.lengths: dict[int, list[int]] = {}

    def __call__(self, prompts, completions, answer, completion_ids, **kwargs):  # type: ignore[no-untyped-def]
        step = self.trainer.state.global_step if self.trainer is not None else 0
        self.lengths.setdefault(step, []).extend(len(ids) for ids in completion_ids)
        return [1.0 if c.strip().split(" ")[0] == str(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def main(argv: list[str] | None = None) -> dict[str, list[int]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("runs/grpo_think_short"))
    ap.add_argument("--schedule", type=Path, default=HERE / "schedule.yaml")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    cur = Curriculum.from_schedule(args.schedule, duration=f"{args.steps} steps")
    model, tok = tiny_llama()
    config = trl.GRPOConfig(
        output_dir=str(args.out),
        max_steps=cur.num_steps,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=max(p.knobs["completion_budget"] for p in cur.plans),
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    reward = Recorder()
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=addition_prompts(4 * args.steps),
        processing_class=tok,
    )
    reward.trainer = trainer
    CompletionBudget(cur).bind(trainer)
    trainer.train()

    result = {
        "budget": [p.knobs["completion_budget"] for p in cur.plans],
        "longest": [max(reward.lengths.get(s, [0])) for s in range(cur.num_steps)],
    }
    for s, (b, n) in enumerate(zip(result["budget"], result["longest"], strict=True)):
        print(f"step {s}: budget {b}, longest completion {n}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
