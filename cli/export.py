"""`sdrt export`: a diffusers checkpoint to verified static-shape ONNX artifacts.
torch is imported when the command runs, never by `sdrt --help` or the runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.engines.specs import DEFAULT_EMBEDDING_SLOTS, Precision

from .errors import writing_into
from .generate import lora_arg


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help="export a diffusers checkpoint to verified static-shape ONNX artifacts",
        description="Export a Stable Diffusion 1.x/2.x, SDXL (base or refiner), LCM or Turbo checkpoint folder "
                    "(diffusers layout, safetensors weights) to text_encoder.onnx (SDXL: and "
                    "text_encoder_2.onnx), unet.onnx (+ unet.onnx.data), vae_decoder.onnx and "
                    "vae_encoder.onnx with static shapes, copy the tokenizer(s) and scheduler config, check "
                    "every graph in ONNX Runtime against torch, and write manifest.json last.")
    export.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="diffusers checkpoint folder")
    export.add_argument("--out", dest="out_dir", type=Path, required=True, metavar="DIR",
                        help="artifact folder to write")
    export.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    export.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    export.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    export.add_argument("--no-cfg", dest="cfg", action="store_const", const=False, default=None,
                        help="no classifier-free guidance (distilled few-step models such as SD-Turbo): the "
                             "U-Net takes batch x1 instead of batch x2. LCM U-Nets (time_cond_proj_dim) never "
                             "run CFG and are exported this way without the flag")
    export.add_argument("--max-prompt-chunks", dest="prompt_chunks", type=int, default=1, metavar="K",
                        help="prompt length the U-Net takes, in chunks of 75 tokens (default 1: 75 tokens, "
                             "as CLIP); longer prompts are cut at K chunks with a warning. Prompts of fewer "
                             "chunks give the same images as on a K=1 artifact")
    export.add_argument("--deepcache", action="store_true",
                        help="also export DeepCache's shallow U-Net (about 1%% of the U-Net's weights), so "
                             "`generate --deepcache N` can run the full U-Net only every N steps; the full U-Net "
                             "then also returns the feature the shallow one reuses")
    export.add_argument("--controlnet", dest="controlnets", action="append", type=Path, default=[],
                        metavar="CN_DIR",
                        help="a diffusers ControlNetModel folder (SD 1.x/2.x) to export with the model; repeat for "
                             "several (their residuals are summed, as diffusers' MultiControlNetModel does). The "
                             "U-Net then takes their residuals: generate with --control-image, one per ControlNet "
                             "in this order")
    export.add_argument("--embedding-slots", type=int, default=DEFAULT_EMBEDDING_SLOTS, metavar="N",
                        help=f"textual inversion: how many embedding vectors one generation may use in all "
                             f"(default {DEFAULT_EMBEDDING_SLOTS}; a multi-vector embedding takes one per vector); "
                             f"0 exports text encoders that take no embeddings")
    export.add_argument("--precision", default="fp32", choices=[p.value for p in Precision],
                        help="precision of the graphs (default: fp32); inputs and outputs stay float32")
    export.add_argument("--vae-precision", choices=[p.value for p in Precision],
                        help="precision of the VAE decoder and encoder (default: same as --precision)")
    export.add_argument("--no-vae-encoder", dest="vae_encoder", action="store_false",
                        help="leave out the VAE encoder (text-to-image only: no input images); not for "
                             "inpainting checkpoints")
    export.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                        help="leave out the checkpoint's safety checker (exported by default when the checkpoint "
                             "has one: generated images it flags as NSFW are returned black, as diffusers does)")
    export.add_argument("--model-name", metavar="NAME", default=None,
                        help="the checkpoint's name in the PNG metadata of generated images (AUTOMATIC1111's "
                             "'Model:'; no commas, colons, quotes or line breaks). Default: the model folder's "
                             "name, or NAME for a Hugging Face cache snapshot (models--ORG--NAME/snapshots/...)")
    export.add_argument("--lora", dest="loras", action="append", type=lora_arg, default=[], metavar="FILE[:SCALE]",
                        help="merge a LoRA into the exported weights at SCALE (default 1.0): the fastest way to "
                             "run one LoRA always; repeat for several. `generate --lora` applies LoRAs per call "
                             "instead")
    export.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the ONNX Runtime vs torch check")
    export.add_argument("--force", action="store_true", help="replace artifacts already in --out")
    export.add_argument("--allow-pickle-code-execution", dest="allow_pickle", action="store_true",
                        help="allow loading pickle-based weights (.bin/.ckpt), which can execute code "
                             "from the file; only for checkpoints from a source you trust")
    export.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    from sdrt.export.verify import table_from_json

    config = ExportConfig(
        model_dir=args.model_dir, out_dir=args.out_dir, height=args.height, width=args.width,
        batch=args.batch, cfg=args.cfg, prompt_chunks=args.prompt_chunks, deepcache=args.deepcache,
        controlnets=tuple(args.controlnets), embedding_slots=args.embedding_slots,
        precision=Precision(args.precision),
        vae_precision=Precision(args.vae_precision) if args.vae_precision else None,
        vae_encoder=args.vae_encoder, safety_checker=args.safety_checker, verify=args.verify, force=args.force,
        allow_pickle=args.allow_pickle, model_name=args.model_name, loras=tuple(args.loras),
    )
    with writing_into(args.out_dir):
        manifest = export_artifacts(config)
    if manifest.verification:
        print(table_from_json(manifest.verification))
    print(f"artifacts: {args.out_dir}")
    return 0
