"""Decoded pixels to PIL images, and PNGs that remember how they were made.

The PNG `parameters` text chunk follows the AUTOMATIC1111 web UI convention, which
other SD tools (ComfyUI, InvokeAI, civitai, image viewers) read:

    a watercolor fox
    Negative prompt: blurry
    Steps: 25, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15, RNG: CPU

`RNG: CPU` is AUTOMATIC1111's name for torch's CPU generator, which sdrt's default
generator reproduces (`RNG: NumPy`: sdrt 0.1's generator). Image tasks add
`Denoising strength` (AUTOMATIC1111's key) and `Task` (img2img, inpaint, outpaint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from sdrt.engines.errors import AlreadyExists, InvalidInput
from sdrt.engines.files import atomic_path

from .schedulers import a1111_name

PARAMETERS_KEY = "parameters"


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """(batch, H, W, 3) floats in [0, 1] -> 8-bit RGB images, rounded like diffusers' numpy_to_pil."""
    return [Image.fromarray(img) for img in (pixels * 255).round().astype(np.uint8)]


RNG_NAMES = {"torch": "CPU", "numpy": "NumPy"}


def parameters_text(prompt: str, negative_prompt: str, steps: int, sampler: str, guidance: float,
                    seed: int | None, width: int, height: int, model: str = "", *, generator: str = "torch",
                    task: str = "txt2img", strength: float | None = None,
                    scheduler_options: Sequence[tuple[str, Any]] = ()) -> str:
    """AUTOMATIC1111's `parameters` text: the sampler under its AUTOMATIC1111 name and
    schedule type ("DPM++ 2M" + "Karras" for dpmpp_2m_karras), the sdrt name where
    AUTOMATIC1111 has none; scheduler options as one JSON value."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    label, schedule = a1111_name(sampler)
    fields = [f"Steps: {steps}", f"Sampler: {label}", f"Schedule type: {schedule}", f"CFG scale: {guidance:g}"]
    if seed is not None:
        fields.append(f"Seed: {seed}")
    fields.append(f"Size: {width}x{height}")   # A1111 writes width x height
    if model:
        fields.append(f"Model: {model}")
    if strength is not None:
        fields.append(f"Denoising strength: {strength:g}")
    if task != "txt2img":
        fields.append(f"Task: {task}")
    if scheduler_options:
        # AUTOMATIC1111 quotes a value holding commas or colons as a JSON string.
        fields.append(f"Scheduler options: {json.dumps(json.dumps(dict(scheduler_options), sort_keys=True))}")
    fields.append(f"RNG: {RNG_NAMES[generator]}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def output_paths(out: str | os.PathLike[str], count: int) -> list[Path]:
    """`out` for one image; for a batch: out.png, out-1.png, out-2.png, ..."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InvalidInput(f"output file {out} must end in .png")
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def write_pngs(paths: Sequence[Path], images: Sequence[Image.Image], parameters: str,
               force: bool = False) -> None:
    """Write each image atomically with its `parameters` chunk. Refuses, before
    writing anything, to replace an existing file unless `force`."""
    if not force:
        for path in paths:
            if path.exists():
                raise AlreadyExists(f"{path} already exists; pass --force to overwrite it")
    for path, image in zip(paths, images):
        if path.is_dir():
            raise InvalidInput(f"output {path} is a folder; name a .png file")
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)


def read_parameters(path: str | os.PathLike[str]) -> str | None:
    with Image.open(path) as im:
        return im.info.get(PARAMETERS_KEY)
