"""`sdrt tiny-lora`: write a LoRA file for a built-in checkpoint. torch is imported when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from sdrt.export.tiny import VARIANTS   # torch is imported only when a file is made

    _register_tiny_lora(sub, VARIANTS)


def _register_tiny_lora(sub: argparse._SubParsersAction, variants: tuple[str, ...]) -> None:
    from sdrt.export.tiny_lora import DTYPES, FORMATS

    lora = sub.add_parser(
        "tiny-lora", help="write a LoRA file for a built-in checkpoint (no download)",
        description="Write a LoRA .safetensors for a built-in checkpoint's architecture, with random weights "
                    "from a fixed seed, made as users' files are made: peft (save_lora_weights), diffusers "
                    "(diffusers 0.2x's layout) or kohya (sd-scripts' names, SDXL in generative-models names).")
    lora.add_argument("out_file", type=Path, metavar="OUT_FILE", help="the .safetensors file to write")
    lora.add_argument("--variant", default="sd15", choices=variants, help="which checkpoint (default: sd15)")
    lora.add_argument("--format", default="peft", choices=FORMATS, help="key layout (default: peft)")
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank (default: 4)")
    lora.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    lora.add_argument("--conv", action="store_true", help="also the convolutions (LoCon)")
    lora.add_argument("--no-text-encoder", dest="text_encoder", action="store_false",
                      help="the U-Net only")
    lora.add_argument("--dtype", default="float32", choices=DTYPES, help="stored dtype (default: float32)")
    lora.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    lora.add_argument("--force", action="store_true", help="replace an existing file")
    lora.set_defaults(handler=run_tiny_lora)


def run_tiny_lora(args: argparse.Namespace) -> int:
    from sdrt.export.tiny_lora import make_tiny_lora

    path = make_tiny_lora(args.out_file, variant=args.variant, format=args.format, rank=args.rank,
                          alpha=args.alpha, text_encoder=args.text_encoder, conv=args.conv, seed=args.seed,
                          dtype=args.dtype, force=args.force)
    print(path)
    return 0
