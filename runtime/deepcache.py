"""DeepCache: which U-Net calls run the full U-Net, and which the shallow one.

DeepCache (Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free",
CVPR 2024) reuses the U-Net's deep features across adjacent steps: a full call also
returns the feature entering the last up block's last resnet, and the calls in
between run only the shallow graph around it (engines/specs.py, unet_shallow_spec).
Training-free, and not exact: it changes the image, so it is off (interval 1) unless
asked for.

The schedules are the reference implementation's (github.com/horseee/DeepCache):
- uniform: a full call every `interval` steps, starting with the first;
- non-uniform (`uniform=False`): ceil(steps / interval) full steps, packed around step
  `center` by a power law (`sample_from_quad_center` in its SD pipeline), which the
  paper reports to keep more quality at large intervals.
Steps are counted per sampler step (a second-order sampler's two calls of one step
share the choice); for the one-call-per-step samplers this is the reference's call
index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdrt.engines.errors import InvalidInput

MAX_INTERVAL = 1000
DEFAULT_POW = 1.4        # the reference's README example for 50 steps: pow=1.4, center=15
CENTER_FRACTION = 0.3    # ... so center defaults to 30% of the steps


@dataclass(frozen=True)
class CacheSchedule:
    interval: int = 1               # 1: every call runs the full U-Net (exact)
    uniform: bool = True
    center: int | None = None       # non-uniform: None = CENTER_FRACTION of the steps
    pow: float = DEFAULT_POW        # non-uniform: the power law's starting exponent (> 1)

    @classmethod
    def create(cls, interval: object = 1, uniform: object = True, center: object = None,
               pow: object = None) -> "CacheSchedule":
        if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= MAX_INTERVAL:
            raise InvalidInput(f"cache_interval must be an integer from 1 (off) to {MAX_INTERVAL}, "
                               f"got {interval!r:.40}")
        if not isinstance(uniform, bool):
            raise InvalidInput(f"cache_uniform must be True or False, got {uniform!r:.40}")
        if (center is not None or pow is not None) and uniform:
            raise InvalidInput("cache_center and cache_pow shape the non-uniform schedule: pass cache_uniform=False")
        if center is not None and (isinstance(center, bool) or not isinstance(center, int) or center < 1):
            raise InvalidInput(f"cache_center must be a positive step index, got {center!r:.40}")
        if pow is None:
            pow = DEFAULT_POW
        if isinstance(pow, bool) or not isinstance(pow, (int, float)) or not 1 < pow <= 10:
            raise InvalidInput(f"cache_pow must be a number in (1, 10], got {pow!r:.40}")
        return cls(interval, uniform, center, float(pow))

    @property
    def enabled(self) -> bool:
        return self.interval > 1

    def full_steps(self, steps: int) -> frozenset[int]:
        """The steps (0-based) whose calls run the full U-Net."""
        if not self.enabled:
            return frozenset(range(steps))
        if self.uniform:
            return frozenset(range(0, steps, self.interval))
        center = round(CENTER_FRACTION * steps) if self.center is None else self.center
        if not center < steps:
            raise InvalidInput(f"cache_center {center} must be below the number of steps ({steps})")
        return frozenset(quad_center_steps(steps, math.ceil(steps / self.interval), center, self.pow))

    def full_calls(self, calls: int, order: int) -> tuple[bool, ...]:
        """Per U-Net call: True where it runs the full U-Net. `order` calls make a step."""
        full = self.full_steps(math.ceil(calls / order))
        return tuple(i // order in full for i in range(calls))


def quad_center_steps(total: int, count: int, center: int, pow: float) -> list[int]:
    """DeepCache's `sample_from_quad_center`: `count` step indices from 0 to `total`,
    dense around `center` and sparse towards both ends (step 0 always). The start of
    the power-law ramp is (-center) ** (1 / pow), a complex number in the reference's
    Python arithmetic; its real part, truncated, is what the reference keeps, and so
    is it here. As there, the exponent is lowered by 0.02 until the count comes out
    exact, and a count that no exponent above 1 gives is refused."""
    if count >= total:
        return list(range(total))
    p = pow
    while p > 1:
        start = complex(-center) ** (1 / p)
        x = np.linspace(start, complex((total - center) ** (1 / p)), count + 1)
        ramp = np.unique((x ** p).real.astype(np.int32))[1:-1]
        indices = [0] + [int(v) + center for v in ramp]
        if len(indices) == count:
            return indices
        p -= 0.02
    raise InvalidInput(f"the non-uniform DeepCache schedule finds no {count} full steps of {total} around step "
                       f"{center}: use another cache_center or cache_interval, or the uniform schedule")
