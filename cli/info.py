"""`sdrt info`: an artifact folder's manifest, readably."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

from sdrt.engines.weightmap import WEIGHT_MAP

from .folders import artifact_folder
from .parser import one_line


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("info", help="describe an artifact folder",
                       description="Print an artifact folder's manifest: model facts, shapes, per-stage "
                                   "tensors and precision, export verification, tools and files.")
    i.add_argument("artifact_dir", metavar="ARTIFACT_DIR", type=Path)
    i.add_argument("--check", action="store_true", help="also verify every file's SHA-256")
    i.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from sdrt.engines.manifest import load_manifest, read_manifest

    folder = artifact_folder(args.artifact_dir)
    m = load_manifest(folder) if args.check else read_manifest(folder)
    # Names and strings come from the manifest: escape control characters, so a hostile
    # file name cannot rewrite the terminal (ANSI escapes) or fake extra lines.
    print("\n".join(one_line(line) for line in format_info(folder, m, checked=args.check).splitlines()))
    return 0
def format_info(folder: Path, m: Any, checked: bool = False) -> str:
    f, s = m.facts, m.shape
    out = [f"artifact folder {folder}"]
    if m.source:
        out.append(f"  source        {m.source}")
    out.append(f"  model         {f.family}, prediction {f.prediction_type}, latent channels {f.latent_channels}, "
               f"VAE scale {f.vae_scale_factor} (scaling factor {f.vae_scaling_factor:g}), "
               f"text {f.text_max_length} x {f.text_hidden_size}")
    out.append(f"  image         {s.width}x{s.height} (native {f.native_image_size}), batch {s.batch}, "
               f"classifier-free guidance {'on' if s.cfg else 'off (--no-cfg)'}")
    room = f.text_max_length - 2
    skip = f"clip skip 0-{f.max_clip_skip}" if f.text_num_layers else "no clip skip (exported by an older sdrt)"
    out.append(f"  prompts       up to {s.prompt_chunks} chunk(s) of {room} tokens ({s.prompt_chunks * room} tokens), "
               f"{skip}")
    out.append("  deepcache     " + ("yes: unet_shallow runs between full U-Net calls (generate --deepcache N)"
                                     if s.deepcache else "no (export with --deepcache to add the shallow U-Net)"))
    ready = WEIGHT_MAP in m.files
    out.append("  loras         " + ("per call (generate --lora FILE[:SCALE])" if ready
                                     else "no per-call LoRAs (exported by an older sdrt: export again)"))
    if m.merged_loras:
        out.append("  merged loras  " + ", ".join(f"{x.get('name')}:{x.get('scale')}" for x in m.merged_loras))
    out.append("  safety        " + (f"yes: the checkpoint's safety checker on {f.safety_image_size}x"
                                     f"{f.safety_image_size} crops; flagged images are returned black "
                                     f"(generate --no-safety-checker skips it)" if f.safety_image_size
                                     else "no safety checker"))
    out.append("  controlnets   " + (f"{s.controlnets}: generate with --control-image, one per ControlNet"
                                     if s.controlnets else "none (export with --controlnet CN_DIR to add them)"))
    out.append("stages")
    for stage, spec in m.specs.items():
        out.append(f"  {stage.value:<13} {m.precisions[stage].value}")
        for kind, tensors in (("in ", spec.inputs), ("out", spec.outputs)):
            for t in tensors:
                out.append(f"      {kind} {t.name:<22} {t.dtype.value:<8} {list(t.shape)}")
    if m.verification:
        out.append("verification (export, against PyTorch)")
        out += _nested(m.verification, 1)
    if m.tools:
        out.append("tools")
        out += [f"  {k:<13} {v}" for k, v in sorted(m.tools.items())]
    out.append("files" + (" (SHA-256 verified)" if checked else " (sizes from the manifest; --check verifies hashes)"))
    total = 0
    for rel, rec in sorted(m.files.items()):
        present = (folder / rel).is_file()
        total += rec.size
        out.append(f"  {rel:<40} {_size(rec.size):>10}  {rec.sha256[:12]}{'' if present else '  MISSING'}")
    out.append(f"  {'total':<40} {_size(total):>10}")
    return "\n".join(out)


def _nested(value: Any, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(value, Mapping):
        lines = []
        for k, v in value.items():
            if isinstance(v, (Mapping, list)) and v and not _flat(v):
                lines.append(f"{pad}{k}")
                lines += _nested(v, depth + 1)
            else:
                lines.append(f"{pad}{k:<24} {_scalar(v)}")
        return lines
    if isinstance(value, list):
        return [line for item in value for line in _nested(item, depth)]
    return [f"{pad}{_scalar(value)}"]


def _flat(v: Any) -> bool:
    items = v.values() if isinstance(v, Mapping) else v
    return all(not isinstance(x, (Mapping, list)) for x in items) and len(v) <= 4


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_scalar(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_scalar(x) for x in v)
    return str(v)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
