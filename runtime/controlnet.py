"""ControlNet at generation: the settings of one call, its control images, and the
per-call weights the controlnet stage multiplies each residual by.

It follows diffusers' StableDiffusionControlNetPipeline (and its Img2Img and Inpaint
siblings, which do the same) step for step:

- a control image is used as given: RGB, resized to the artifact's size, pixels in
  [0, 1] (`control_image_processor`: VaeImageProcessor(do_normalize=False)), the same
  image for every batch item; no preprocessor (Canny, depth, ...) runs;
- `controlnet_conditioning_scale` multiplies a ControlNet's residuals; with several
  ControlNets (MultiControlNetModel) each has its own scale and image and their
  weighted residuals are summed;
- `control_guidance_start` / `control_guidance_end`: a ControlNet acts on call i of n
  unless i / n < start or (i + 1) / n > end (diffusers' `controlnet_keep`, over the
  calls the run makes, so an image-to-image run counts its strength-shortened schedule);
- guess mode: ControlNetModel weighs its residuals from 0.1 (the first) to 1 (the mid
  block's) on a log scale (`torch.logspace(-1, 0, n)`), and with classifier-free
  guidance the ControlNet conditions only the conditional half: the unconditional half
  gets zero residuals.

All of that is one table, `scale_table`: per call, ControlNet, row of the guided batch
and residual, a weight. The controlnet stage runs on the whole guided batch; a row
whose weight is 0 (guess mode's unconditional half) contributes exactly 0, as
diffusers' zeros do.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdrt.engines.errors import InvalidInput, InvalidType

from . import inputs

MAX_CONTROL_SCALE = 10.0   # far past any useful weight (AUTOMATIC1111's slider stops at 2)
# controlnet_conditioning_scale's defaults: StableDiffusionControlNetPipeline 1.0,
# ...Img2ImgPipeline 0.8, ...InpaintPipeline 0.5 (outpainting is inpainting).
DEFAULT_SCALES = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 0.5, "outpaint": 0.5}


@dataclass(frozen=True)
class ControlSettings:
    """One call's ControlNet settings, one entry per ControlNet of the artifact."""

    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool = False

    @classmethod
    def create(cls, count: int, scale: Any = None, start: Any = None, end: Any = None,
               guess_mode: Any = False, task: str = "txt2img") -> "ControlSettings":
        """`scale`, `start`, `end`: one number for every ControlNet or a list of `count`
        (None: diffusers' defaults for `task`, a Task value: scale DEFAULT_SCALES[task],
        start 0.0, end 1.0)."""
        if not isinstance(guess_mode, bool):
            raise InvalidType(f"guess_mode must be True or False, got {type(guess_mode).__name__} {guess_mode!r:.40}")
        scales = _per_net("controlnet_conditioning_scale", DEFAULT_SCALES[task] if scale is None else scale, count)
        starts = _per_net("control_guidance_start", 0.0 if start is None else start, count)
        ends = _per_net("control_guidance_end", 1.0 if end is None else end, count)
        for k, s in enumerate(scales):
            if not 0.0 <= s <= MAX_CONTROL_SCALE:
                raise InvalidInput(f"controlnet_conditioning_scale{_which(k, count)} must be from 0 to "
                                   f"{MAX_CONTROL_SCALE:g}, got {s:g}")
        for k, (s, e) in enumerate(zip(starts, ends)):
            if not 0.0 <= s < 1.0:
                raise InvalidInput(f"control_guidance_start{_which(k, count)} must be in [0, 1), got {s:g}")
            if not 0.0 < e <= 1.0:
                raise InvalidInput(f"control_guidance_end{_which(k, count)} must be in (0, 1], got {e:g}")
            if s >= e:
                raise InvalidInput(f"control_guidance_start{_which(k, count)} {s:g} must be below "
                                   f"control_guidance_end {e:g}")
        return cls(scales, starts, ends, guess_mode)

    @property
    def count(self) -> int:
        return len(self.scales)

    def keep(self, i: int, calls: int) -> tuple[float, ...]:
        """diffusers' controlnet_keep[i]: 1.0 for each ControlNet acting on call i of `calls`, else 0.0."""
        return tuple(1.0 - float(i / calls < s or (i + 1) / calls > e) for s, e in zip(self.starts, self.ends))


def scale_table(settings: ControlSettings, calls: int, batch: int, cfg_graph: bool, use_cfg: bool,
                residuals: int) -> np.ndarray:
    """float32 (calls, ControlNets, guided batch rows, residuals): the weight of each
    residual in each call, as diffusers computes it. A ControlNet's weight is
    float32(scale * keep), and in guess mode float32(logspace_j) * float32(scale * keep)
    rounded to float32, which is what `torch.logspace(-1, 0, n) * conditioning_scale`
    gives (float32 tensor times a Python float computes in float32)."""
    rows = 2 * batch if cfg_graph else batch
    table = np.zeros((calls, settings.count, rows, residuals), dtype=np.float32)
    # torch.logspace computes in double and rounds once (checked against torch in the tests).
    ramp = (10.0 ** np.linspace(-1.0, 0.0, residuals)).astype(np.float32)
    # Guess mode with CFG: the unconditional rows get zero residuals.
    first = batch if settings.guess_mode and cfg_graph and use_cfg else 0
    for i in range(calls):
        for k, keep in enumerate(settings.keep(i, calls)):
            weight = np.float32(settings.scales[k] * keep)
            table[i, k, first:] = ramp * weight if settings.guess_mode else weight
    return table


def control_images(value: Any, count: int, height: int, width: int) -> np.ndarray:
    """`control_image` (one image for one ControlNet, or a list of one per ControlNet)
    -> float32 (count, 1, 3, height, width) in [0, 1]: diffusers' control image
    processor (RGB, resized to the artifact's size like `image`, not normalized)."""
    if isinstance(value, (list, tuple)):
        items = list(value)
        if len(items) != count:
            raise InvalidInput(f"control_image has {len(items)} images but this artifact has {count} "
                               f"ControlNet(s): pass one image per ControlNet, in the order they were exported")
    elif count == 1:
        items = [value]
    else:
        raise InvalidInput(f"this artifact has {count} ControlNets: pass control_image as a list of {count} images, "
                           f"one per ControlNet in the order they were exported")
    out = []
    for k, item in enumerate(items):
        what = "control image" if count == 1 else f"control image {k}"
        if item is None:
            raise InvalidInput(f"{what} is None: every ControlNet needs its image (a scale of 0 turns one off)")
        source = item if isinstance(item, np.ndarray) else inputs.load_image(item, what)
        out.append(inputs.preprocess_image(source, height, width, normalize=False, what=what))
    return np.stack(out).astype(np.float32)


def _per_net(name: str, value: Any, count: int) -> tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InvalidInput(f"{name} has {len(value)} values but this artifact has {count} ControlNet(s): pass one "
                               f"number or a list of {count}")
        items = list(value)
    else:
        items = [value] * count
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise InvalidType(f"{name} must be a number or a list of numbers, got {type(v).__name__} {v!r:.40}")
        if not math.isfinite(float(v)):
            raise InvalidInput(f"{name} must be finite, got {v!r:.40}")
        out.append(float(v))
    return tuple(out)


def _which(k: int, count: int) -> str:
    return f" of ControlNet {k}" if count > 1 else ""
