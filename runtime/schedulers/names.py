"""What users call samplers, both ways: sdrt's names ("dpmpp_2m_karras"), the
AUTOMATIC1111 web UI's ("DPM++ 2M Karras", or "DPM++ 2M" with "Schedule type: Karras"),
and the sigma-ramp shorthands.

An sdrt name is a sampler (one diffusers scheduler class with the options that tell
its algorithm apart) plus, for samplers that take them, a sigma ramp suffix:
"_karras", "_exponential" or "_beta" turn on diffusers' use_<ramp>_sigmas; the bare
name is the plain spacing, whatever the checkpoint's config says, so the name alone
tells which schedule ran.

The AUTOMATIC1111 names are those of its sampler list (modules/sd_samplers_kdiffusion.py,
sd_samplers_timesteps.py) and its "Schedule type" list (modules/sd_schedulers.py), as the
diffusers scheduler overview maps them to diffusers classes.
"""

from __future__ import annotations

from sdrt.engines.errors import InvalidInput

RAMP_SUFFIXES = ("karras", "exponential", "beta")

# AUTOMATIC1111 sampler name -> sdrt sampler (see the overview table in diffusers'
# docs/source/en/api/schedulers/overview.md). Samplers without an entry have no
# AUTOMATIC1111 counterpart (deis, tcd, dpmpp_2s) and are written under their own name.
A1111_SAMPLERS: dict[str, str] = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "LMS": "lms",
    "Heun": "heun",
    "DPM2": "kdpm2",
    "DPM2 a": "kdpm2_a",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DDIM": "ddim",
    "PLMS": "pndm",
    "UniPC": "unipc",
    "LCM": "lcm",
    "DDPM": "ddpm",
}
# AUTOMATIC1111 names sdrt cannot follow, with why, so the refusal helps.
A1111_UNSUPPORTED: dict[str, str] = {
    "DPM++ 2S a": "it is ancestral, and diffusers has no ancestral single-step DPM-Solver++; "
                  "'dpmpp_2s' is the deterministic one",
    "DPM++ 2M SDE Heun": "use 'dpmpp_2m_sde' with --scheduler-option solver_type=heun",
    "DPM++ 3M SDE": "diffusers has no third-order SDE DPM-Solver++",
    # DPMSolverSDEScheduler: its Brownian-tree noise (torchsde) is queried at times rounded
    # to 1e-6 from torch's float32 exp/log/sqrt, which on x86 come from MKL and are not
    # correctly rounded; NumPy's are, so about a third of trajectories part by up to 7e-4.
    "DPM++ SDE": "its Brownian-tree noise depends on torch's platform-specific float32 exp/log/sqrt "
                 "rounding, so sdrt cannot match diffusers' images; 'dpmpp_2m_sde' is the closest sampler",
    "DPM fast": "it has no diffusers counterpart",
    "DPM adaptive": "it has no diffusers counterpart",
    "Restart": "it has no diffusers counterpart",
    "DDIM CFG++": "it has no diffusers counterpart",
    "Euler CFG++": "it has no diffusers counterpart",
}
# AUTOMATIC1111 "Schedule type" -> sdrt ramp suffix ("" = the plain spacing).
A1111_SCHEDULES: dict[str, str] = {
    "Automatic": "",
    "Uniform": "",
    "Karras": "karras",
    "Exponential": "exponential",
    "Beta": "beta",
}
A1111_PLAIN_SCHEDULE = "Uniform"
# What "Schedule type: Automatic" runs in the web UI (1.9+): the sampler's own default
# schedule, the 'scheduler' option of its entry in sd_samplers_kdiffusion.py
# (DPM++ 2M: karras, DPM++ 2M SDE: exponential); the others run the uniform one.
A1111_AUTOMATIC: dict[str, str] = {"dpmpp_2m": "karras", "dpmpp_2m_sde": "exponential"}


def split(name: str) -> tuple[str, str]:
    """'dpmpp_2m_karras' -> ('dpmpp_2m', 'karras'); 'euler' -> ('euler', '')."""
    for suffix in RAMP_SUFFIXES:
        if name.endswith("_" + suffix):
            return name[: -len(suffix) - 1], suffix
    return name, ""


def join(sampler: str, ramp: str) -> str:
    return f"{sampler}_{ramp}" if ramp else sampler


def from_a1111(text: str, schedule_type: str | None = None) -> tuple[str, str] | None:
    """(sampler, ramp) for an AUTOMATIC1111 sampler name, either the old combined form
    ("DPM++ 2M Karras") or the name with a separate schedule type. None when `text` is
    not an AUTOMATIC1111 name. Case and spacing are forgiven; an AUTOMATIC1111 name sdrt
    cannot follow, or an unknown schedule type, is refused with the reason."""
    words = " ".join(text.split()).lower()
    ramp = None
    if schedule_type is not None:
        ramp = schedule_type   # resolved below, once the sampler is known
    else:
        for label, suffix in A1111_SCHEDULES.items():
            if suffix and words.endswith(" " + label.lower()):
                words, ramp = words[: -len(label) - 1], suffix
                break
    for label, why in A1111_UNSUPPORTED.items():
        if words == label.lower():
            raise InvalidInput(f"the AUTOMATIC1111 sampler {label!r} is not supported: {why}")
    for label, sampler in A1111_SAMPLERS.items():
        if words == label.lower():
            return sampler, _schedule(ramp, sampler) if schedule_type is not None else ramp or ""
    return None


def _schedule(label: str, sampler: str) -> str:
    """The ramp suffix of an AUTOMATIC1111 schedule type for `sampler`."""
    for known, suffix in A1111_SCHEDULES.items():
        if " ".join(label.split()).lower() == known.lower():
            return A1111_AUTOMATIC.get(sampler, "") if known == "Automatic" else suffix
    raise InvalidInput(f"unknown or unsupported schedule type {label!r}: sdrt follows "
                       f"{', '.join(A1111_SCHEDULES)}")


def to_a1111(sampler: str, ramp: str) -> tuple[str, str]:
    """(AUTOMATIC1111 sampler name, schedule type) to record for an sdrt sampler and
    ramp; samplers AUTOMATIC1111 lacks keep their sdrt name."""
    label = next((k for k, v in A1111_SAMPLERS.items() if v == sampler), sampler)
    schedule = next((k for k, v in A1111_SCHEDULES.items() if v == ramp and v), A1111_PLAIN_SCHEDULE)
    return label, schedule
