"""`sdrt tiny-model`: write a built-in checkpoint. torch is imported when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import writing_into


def register(sub: argparse._SubParsersAction) -> None:
    from sdrt.export.tiny import CONTROLNET_VARIANTS, EMBEDDING_FORMATS, VARIANTS   # torch only when a model is made

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
    emb = tiny.add_argument_group("embedding", "write a textual-inversion embedding for the variant's text encoder(s) "
                                               "instead of a checkpoint: OUT_DIR is then the .safetensors file")
    emb.add_argument("--embedding", choices=EMBEDDING_FORMATS, default=None, metavar="FORMAT",
                     help="a1111 (emb_params; SDXL: clip_l + clip_g; the trigger is the file's name) or diffusers "
                          "({token: vectors})")
    emb.add_argument("--vectors", type=int, default=2, help="vectors of the embedding (default 2)")
    emb.add_argument("--token", default=None, help="diffusers format: the stored token (default: <file name>)")
    tiny.set_defaults(handler=run_tiny_model)


def run_tiny_model(args: argparse.Namespace) -> int:
    from sdrt.export.tiny import make_tiny_embedding, make_tiny_model

    if args.embedding is not None:
        with writing_into(args.out_dir.parent):
            path = make_tiny_embedding(args.out_dir, variant=args.variant, vectors=args.vectors,
                                       format=args.embedding, token=args.token, seed=args.seed, force=args.force)
        print(path)
        return 0
    with writing_into(args.out_dir):
        path = make_tiny_model(args.out_dir, variant=args.variant, seed=args.seed, force=args.force)
    print(path)
    return 0
