"""rampup export: a run or checkpoint as a Hugging Face model folder."""

from __future__ import annotations

import argparse

from rampup.commands import console
from rampup.tools.export import export_hf


def run(args: argparse.Namespace) -> int:

    out = export_hf(args.path, args.out_dir, dtype=args.dtype, ema=args.ema, subnet=args.subnet)
    if (out / "config.yaml").is_file():  # an image run
        console.print(f"exported {args.path} as an image classifier: {out} (rampup.tools.images.load_classifier)")
        return 0
    console.print(
        f"exported {args.path} as a Hugging Face model: {out} (AutoModelForCausalLM / AutoTokenizer .from_pretrained)"
    )
    return 0
