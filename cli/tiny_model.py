"""`sdrt tiny-model`: write a built-in checkpoint. torch is imported when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import writing_into


def register(sub: argparse._SubParsersAction) -> None:
    from sdrt.export.tiny import CONTROLNET_VARIANTS, VARIANTS   # torch is imported only when a model is made

    tiny = sub.add_parser(
        "tiny-model", help="write a built-in Stable Diffusion checkpoint (no download)",
        description="Write a built-in checkpoint in the diffusers layout with random weights from a fixed "
                    "seed and the real CLIP vocabulary. sd15, sd2, sd15-inpaint, lcm and sdxl are tiny "
                    "(for tests and demos); sd15-full and sd21-full are the published full-size "
                    "architectures (several GB). sd15-safety is the tiny sd15 with a tiny safety checker "
                    "and feature extractor (its thresholds flag nothing); controlnet is a ControlNetModel "
                    "folder for the sd15 variant (`sdrt export --controlnet`).")
    tiny.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to create")
    tiny.add_argument("--variant", default="sd15", choices=VARIANTS + CONTROLNET_VARIANTS,
                      help="which model family and size (default: sd15)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    tiny.add_argument("--force", action="store_true", help="replace an existing checkpoint folder")
    tiny.set_defaults(handler=run_tiny_model)


def run_tiny_model(args: argparse.Namespace) -> int:
    from sdrt.export.tiny import make_tiny_model

    with writing_into(args.out_dir):
        path = make_tiny_model(args.out_dir, variant=args.variant, seed=args.seed, force=args.force)
    print(path)
    return 0
