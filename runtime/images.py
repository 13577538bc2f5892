"""Decoded pixels to PIL images, and PNGs that remember how they were made.

Each PNG carries a `parameters` text chunk in the AUTOMATIC1111 web UI's format, which
other SD tools (ComfyUI, InvokeAI, civitai, sd-parsers, image viewers) read; infotext.py
writes and reads that text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdrt.engines.errors import AlreadyExists, InvalidInput, MissingFile
from sdrt.engines.files import atomic_path

PARAMETERS_KEY = "parameters"


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """(batch, H, W, 3) floats in [0, 1] -> 8-bit RGB images, rounded like diffusers' numpy_to_pil."""
    return [Image.fromarray(img) for img in (pixels * 255).round().astype(np.uint8)]


def output_paths(out: str | os.PathLike[str], count: int) -> list[Path]:
    """`out` for one image; for a batch: out.png, out-1.png, out-2.png, ..."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InvalidInput(f"output file {out} must end in .png")
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def write_pngs(paths: Sequence[str | os.PathLike[str]], images: Sequence[Image.Image],
               parameters: str | None = None, force: bool = False) -> None:
    """Write each image atomically with a `parameters` chunk: `parameters`, or (None)
    the image's own image.info["parameters"], which the pipeline sets and PIL's
    Image.save leaves out. Refuses, before writing anything, to replace an existing
    file unless `force`."""
    paths = [Path(p) for p in paths]
    if not force:
        for path in paths:
            if path.exists():
                raise AlreadyExists(f"{path} already exists; pass --force to overwrite it")
    for path, image in zip(paths, images):
        if path.is_dir():
            raise InvalidInput(f"output {path} is a folder; name a .png file")
        info = PngImagePlugin.PngInfo()
        text = image.info.get(PARAMETERS_KEY) if parameters is None else parameters
        if text is not None:
            info.add_text(PARAMETERS_KEY, text)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)


def read_parameters(path: str | os.PathLike[str]) -> str | None:
    """The image's `parameters` text, None when it has none. Raises MissingFile or
    InvalidInput (not an image) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with Image.open(path) as im:
            text = im.info.get(PARAMETERS_KEY)
            if text is None and im.format == "PNG":
                text = im.text.get(PARAMETERS_KEY)   # a text chunk after the pixels: read to the end
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        # PIL's errors for a damaged or hostile file
        raise InvalidInput(f"{path} is not a readable image ({type(e).__name__}: {e})") from None
    return text if isinstance(text, str) else None
