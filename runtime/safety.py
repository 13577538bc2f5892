"""The safety checker's host side: the CLIP feature extractor in NumPy/Pillow, and
diffusers' rule that turns the engine's concept scores into per-image flags.

diffusers (StableDiffusionPipeline.run_safety_checker, 0.42) runs the checker after
decoding: the decoded images as 8-bit PIL images (`numpy_to_pil`) go through the
checkpoint's CLIPImageProcessor, StableDiffusionSafetyChecker scores them against its
concept embeddings, and every flagged image is replaced by zeros before
postprocessing skips denormalising it, so it comes out black in every output type.
The engine (export/graphs.py SafetyCheckerGraph) returns the cosine similarities
minus the thresholds; the rounding and the special-care adjustment, a sequential
per-image loop in diffusers, are done here exactly as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from sdrt.engines.errors import ArtifactError
from sdrt.engines.files import read_json_object

# Where the artifact keeps the checkpoint's feature_extractor/preprocessor_config.json
# (the same path as in a diffusers checkpoint).
PREPROCESSOR_CONFIG = "feature_extractor/preprocessor_config.json"
# transformers' CLIPImageProcessor defaults (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), for keys a config leaves out.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# diffusers' StableDiffusionSafetyChecker.forward: once an image matches a special-care
# concept, every later score of that image gets this much added ("a stronger filter").
SPECIAL_CARE_ADJUSTMENT = 0.01


@dataclass(frozen=True)
class ClipImageProcessing:
    """transformers' CLIPImageProcessor (the PIL backend: Pillow resize, NumPy crop,
    rescale and normalise; transformers' image_transforms) for RGB PIL images."""

    resize: tuple[str, int, int] | None   # ("shortest_edge", n, 0) or ("size", height, width); None: no resize
    resample: int                         # a PIL filter (3 = bicubic)
    crop: tuple[int, int] | None          # center crop (height, width)
    rescale_factor: float | None          # 1/255 unless do_rescale is false
    mean: tuple[float, ...] | None        # None: no normalisation
    std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str) -> "ClipImageProcessing":
        """Read a preprocessor_config.json as transformers does (an int `size` is the
        shortest edge, an int `crop_size` a square); ArtifactError naming the bad key."""
        def flag(key: str) -> bool:
            value = config.get(key, True)
            if not isinstance(value, bool):
                raise ArtifactError(f"{where}: {key} must be true or false, got {value!r:.40}")
            return value

        def positive(value: Any, key: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 8192:
                raise ArtifactError(f"{where}: {key} must be a positive integer number of pixels, got {value!r:.40}")
            return value

        resize = None
        if flag("do_resize"):
            size = config.get("size", {"shortest_edge": 224})
            if isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
                resize = ("shortest_edge", positive(size["shortest_edge"], "size.shortest_edge"), 0)
            elif isinstance(size, Mapping) and set(size) == {"height", "width"}:
                resize = ("size", positive(size["height"], "size.height"), positive(size["width"], "size.width"))
            elif isinstance(size, int) and not isinstance(size, bool):
                resize = ("shortest_edge", positive(size, "size"), 0)
            else:
                raise ArtifactError(f"{where}: size {size!r:.60} is not supported: sdrt reads an integer, "
                                    f"{{\"shortest_edge\": N}} or {{\"height\": H, \"width\": W}}")
        resample = config.get("resample", 3)
        if isinstance(resample, bool) or resample not in {int(r) for r in Image.Resampling}:
            raise ArtifactError(f"{where}: resample {resample!r:.40} is not a PIL filter (0-5; 3 is bicubic)")
        crop = None
        if flag("do_center_crop"):
            size = config.get("crop_size", {"height": 224, "width": 224})
            if isinstance(size, Mapping) and set(size) == {"height", "width"}:
                crop = (positive(size["height"], "crop_size.height"), positive(size["width"], "crop_size.width"))
            elif isinstance(size, int) and not isinstance(size, bool):
                crop = (positive(size, "crop_size"),) * 2
            else:
                raise ArtifactError(f"{where}: crop_size {size!r:.60} is not supported: sdrt reads an integer "
                                    f"or {{\"height\": H, \"width\": W}}")
        factor = None
        if flag("do_rescale"):
            factor = config.get("rescale_factor", 1 / 255)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
                raise ArtifactError(f"{where}: rescale_factor must be a positive number, got {factor!r:.40}")
        mean = std = None
        if flag("do_normalize"):
            mean, std = (_triple(config.get(k, default), k, where) for k, default in
                         (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)))
            if not all(s > 0 for s in std):
                raise ArtifactError(f"{where}: image_std must be positive, got {list(std)}")
        return cls(resize, int(resample), crop, None if factor is None else float(factor), mean, std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the pixel values an image of this size becomes."""
        if self.crop is not None:
            return self.crop
        return self._resized(height, width)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> float32 pixel values (batch, 3, height, width)."""
        return np.stack([self._one(image) for image in images]).astype(np.float32, copy=False)

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if self.resize is None:
            return height, width
        kind, a, b = self.resize
        if kind == "size":
            return a, b
        # image_transforms.get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = a, int(a * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def _one(self, image: Image.Image) -> np.ndarray:
        if self.resize is not None:
            h, w = self._resized(image.height, image.width)
            image = image.resize((w, h), resample=Image.Resampling(self.resample))
        x = np.asarray(image.convert("RGB") if image.mode != "RGB" else image).transpose(2, 0, 1)
        if self.crop is not None:
            x = _center_crop(x, *self.crop)
        if self.rescale_factor is not None:
            # image_transforms.rescale: upcast to float64, scale, then float32
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.mean is not None:
            # image_transforms.normalize: in float32 (a uint8 image is cast first)
            x = x.astype(np.float32, copy=False)
            mean, std = np.array(self.mean, np.float32), np.array(self.std, np.float32)
            x = ((x.T - mean) / std).T
        return x


def _triple(value: Any, key: str, where: str) -> tuple[float, ...]:
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (not isinstance(values, (list, tuple)) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)):
        raise ArtifactError(f"{where}: {key} must be a number or three numbers (R, G, B), got {value!r:.60}")
    return tuple(float(v) for v in values)


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """image_transforms.center_crop on a (C, H, W) array: the centre, floor-offset,
    zero-padded (centred, ceil-offset) where the image is smaller than the crop."""
    h, w = x.shape[1:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return x[:, top:top + height, left:left + width]
    nh, nw = max(height, h), max(width, w)
    padded = np.zeros((x.shape[0], nh, nw), dtype=x.dtype)
    top_pad, left_pad = ceil((nh - h) / 2), ceil((nw - w) / 2)
    padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = x
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]


def read_processing(folder: Path, image_size: int) -> ClipImageProcessing:
    """The artifact's feature extractor, checked to produce the safety checker's input
    size from the artifact's images; ArtifactError (one line) if missing or unusable."""
    path = folder / PREPROCESSOR_CONFIG
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: the safety checker needs its feature extractor config; "
                            f"export the model again")
    processing = ClipImageProcessing.from_config(read_json_object(path, ArtifactError, "preprocessor config"),
                                                 str(path))
    if processing.crop is not None and processing.crop != (image_size, image_size):
        raise ArtifactError(f"{path}: crop_size {processing.crop[1]}x{processing.crop[0]} differs from the safety "
                            f"checker's input {image_size}x{image_size}")
    return processing


def flags(special_scores: np.ndarray, concept_scores: np.ndarray) -> list[bool]:
    """diffusers' StableDiffusionSafetyChecker.forward on its scores (cosine minus
    threshold, float32), per image: each score plus the adjustment, rounded to 3
    decimals; a special-care score above 0 raises the adjustment to 0.01 for every
    later score of the image, special-care ones included; any concept score above 0
    flags the image. Python's round on the float32 scalars, as there."""
    result = []
    for special, concept in zip(special_scores, concept_scores):
        adjustment = 0.0
        for score in special:
            if round(score + adjustment, 3) > 0:
                adjustment = SPECIAL_CARE_ADJUSTMENT
        result.append(any(round(score + adjustment, 3) > 0 for score in concept))
    return result


def black_out(pixels: np.ndarray, flagged: Sequence[bool]) -> np.ndarray:
    """A copy of `pixels` with the flagged images all zeros, as diffusers returns them."""
    out = pixels.copy()
    out[np.asarray(flagged, dtype=bool)] = 0
    return out
