"""AUTOMATIC1111's web UI API (`/sdapi/v1/...`), as its clients and plug-ins speak it.

Request fields follow the web UI's StableDiffusionTxt2Img/Img2ImgProcessingAPI models
(modules/api/models.py). A field sdrt does not use and that cannot change the image
(save_images, do_not_save_grid, eta for deterministic samplers...) is ignored; a field
that would change the image and that sdrt cannot honour (enable_hr, restore_faces, a
size other than the artifact's, a script) is refused with a 422 naming it, so no
client gets a different picture than it asked for without being told.

Settings map onto `Pipeline.__call__` as `sdrt generate`'s flags do: sampler_name and
scheduler -> the sampler (AUTOMATIC1111 names, "Automatic" as the web UI 1.9+ reads it),
cfg_scale -> guidance, CLIP_stop_at_last_layers N -> clip_skip N - 1, denoising_strength
-> strength; image i of a request has seed `seed + i`, as the web UI's all_seeds.
`<lora:NAME:WEIGHT>` in the prompt picks NAME.safetensors from the server's --lora-dir.
"""

from __future__ import annotations

import base64
import json
import random
import re
import time
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict

from sdrt.engines.errors import InvalidInput

from . import images as request_images
from .executor import Executor, Model
from .jobs import Job, JobResult, embedding_path, embeddings_used, lora_path

# override_settings keys that sdrt honours; others that would change the image are refused.
CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"
MODEL_SETTING = "sd_model_checkpoint"
_REFUSED_SETTINGS = {
    "sd_vae": lambda v: v not in (None, "", "Automatic", "None"),
    "eta_noise_seed_delta": lambda v: v not in (None, 0),
    "randn_source": lambda v: v not in (None, "CPU"),
    "sdxl_refiner_low_aesthetic_score": lambda v: False,
}
# (field, is the value one sdrt cannot honour?, why) for both tasks.
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("enable_hr", lambda v: bool(v), "hires. fix is not supported: the artifact generates one static size"),
    ("restore_faces", lambda v: bool(v), "face restoration is not part of sdrt"),
    ("tiling", lambda v: bool(v), "tiling (seamless textures) is not supported"),
    ("subseed_strength", lambda v: bool(v) and v > 0, "variation seeds are not supported"),
    ("seed_resize_from_h", lambda v: v not in (None, 0, -1), "resizing seeds is not supported"),
    ("seed_resize_from_w", lambda v: v not in (None, 0, -1), "resizing seeds is not supported"),
    ("styles", lambda v: bool(v), "this server has no saved styles"),
    ("script_name", lambda v: bool(v), "scripts are not supported"),
    ("alwayson_scripts", lambda v: bool(v), "extensions' scripts are not supported"),
    ("refiner_checkpoint", lambda v: bool(v) and v != "None", "a refiner is not supported here"),
    ("s_churn", lambda v: v not in (None, 0), "sdrt's samplers have no churn"),
    ("s_tmin", lambda v: v not in (None, 0), "sdrt's samplers have no churn"),
    ("s_tmax", lambda v: v not in (None, 0), "sdrt's samplers have no churn"),
    ("s_noise", lambda v: v not in (None, 1), "sdrt's samplers have no noise multiplier"),
    ("firstpass_image", lambda v: bool(v), "hires. fix is not supported"),
)
_IMG2IMG_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("resize_mode", lambda v: v not in (None, 0), "only 0 (just resize) is supported"),
    ("initial_noise_multiplier", lambda v: v not in (None, 1), "it is not supported"),
    ("latent_mask", lambda v: bool(v), "it is not supported"),
)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
MAX_SEED_A1111 = 2**64 - 1
A1111_DENOISING_STRENGTH = 0.75   # the web UI's img2img default (sdrt generate's is diffusers' 0.8)


class Txt2ImgRequest(BaseModel):
    """AUTOMATIC1111's txt2img request. Only the fields listed are read; others are ignored."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    enable_hr: bool = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    subseed_strength: float = 0.0


class Img2ImgRequest(Txt2ImgRequest):
    """AUTOMATIC1111's img2img request: init_images (base64), and for inpainting mask."""

    init_images: list[str] = []
    mask: str | None = None
    denoising_strength: float | None = None
    mask_blur: float | None = None
    mask_blur_x: float | None = None
    mask_blur_y: float | None = None
    inpainting_mask_invert: int = 0
    inpainting_fill: int | None = None
    inpaint_full_res: bool | int | None = None


def job_from_request(body: BaseModel, executor: Executor, img2img: bool) -> tuple[Job, Model, dict[str, Any]]:
    """The job of a txt2img / img2img request, checked against the model it names."""
    fields: dict[str, Any] = {**body.model_dump(), **(body.model_extra or {})}
    for name, bad, why in _UNSUPPORTED + (_IMG2IMG_UNSUPPORTED if img2img else ()):
        if name in fields and bad(fields[name]):
            raise InvalidInput(f"{name}={fields[name]!r} is not supported: {why}")
    overrides = dict(fields.get("override_settings") or {})
    if not isinstance(overrides, dict):
        raise InvalidInput("override_settings must be an object")
    for name, bad in _REFUSED_SETTINGS.items():
        if name in overrides and bad(overrides[name]):
            raise InvalidInput(f"override_settings.{name}={overrides[name]!r} is not supported")
    model = executor.model(overrides.get(MODEL_SETTING))
    config = executor.config
    _check_size(fields, model)
    count = _int(fields, "batch_size", 1) * _int(fields, "n_iter", 1)
    if not 1 <= count <= config.max_images:
        raise InvalidInput(f"batch_size x n_iter = {count} images; this server makes 1 to {config.max_images} per "
                           f"request (--max-images)")
    prompt, loras = extra_networks(fields.get("prompt") or "")
    negative = fields.get("negative_prompt") or ""
    settings: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative or None}
    if fields.get("steps") is not None:
        settings["steps"] = fields["steps"]
    if fields.get("cfg_scale") is not None:
        settings["guidance"] = fields["cfg_scale"]
    sampler = fields.get("sampler_name") or fields.get("sampler_index")
    if sampler:
        settings["scheduler"] = sampler_of(sampler, fields.get("scheduler"))
    if overrides.get(CLIP_SKIP_SETTING) not in (None, 1, 0):
        skip = overrides[CLIP_SKIP_SETTING]
        if not isinstance(skip, int) or skip < 1:
            raise InvalidInput(f"override_settings.{CLIP_SKIP_SETTING} must be an integer >= 1, got {skip!r}")
        settings["clip_skip"] = skip - 1
    images: dict[str, bytes] = {}
    if img2img:
        images, strength = _img2img_inputs(fields, config.max_image_pixels)
        if strength is not None:
            settings["strength"] = strength
    seeds = seeds_from(fields.get("seed"), count)
    used = embeddings_used(config.embedding_dir, [prompt, negative])
    job = Job(model.name, settings, seeds, images, tuple(loras), used, id=f"task({random.getrandbits(48):012x})")
    validate(job, model, executor)
    return job, model, fields


def _int(fields: Mapping[str, Any], name: str, default: int) -> int:
    value = fields.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{name} must be an integer, got {value!r}")
    return value


def _check_size(fields: Mapping[str, Any], model: Model) -> None:
    w, h = fields.get("width"), fields.get("height")
    if (w not in (None, 0, model.width)) or (h not in (None, 0, model.height)):
        raise InvalidInput(f"width={w} height={h}: model {model.name} generates {model.width}x{model.height} "
                           f"images (the size it was exported at); ask for that size, or export the checkpoint "
                           f"again with --width {w} --height {h}")


def sampler_of(name: str, schedule: str | None) -> str:
    """The sdrt sampler of an AUTOMATIC1111 sampler name and schedule type ("automatic"
    or absent: the web UI 1.9+'s default schedule for the sampler); an sdrt name passes."""
    from sdrt.runtime.schedulers import names

    found = names.from_a1111(name, schedule if schedule else "Automatic")
    if found is None:
        if schedule and schedule.lower() not in ("automatic", ""):
            raise InvalidInput(f"scheduler {schedule!r} applies to AUTOMATIC1111 sampler names; {name!r} is not one")
        return name   # an sdrt name ("dpmpp_2m_karras"), checked by the pipeline
    return names.join(*found)


def extra_networks(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Take `<lora:NAME:WEIGHT>` out of a prompt, as the web UI does: (prompt, [(NAME, WEIGHT)])."""
    loras: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        kind, name, weight = m.group(1).lower(), m.group(2).strip(), m.group(3)
        if kind not in ("lora", "lyco"):
            raise InvalidInput(f"<{kind}:...> in the prompt is not supported: sdrt serves <lora:NAME:WEIGHT>")
        try:
            scale = 1.0 if weight in (None, "") else float(weight)
        except ValueError:
            raise InvalidInput(f"<lora:{name}:{weight}>: the weight is not a number") from None
        loras.append((name, scale))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), loras


def seeds_from(seed: Any, count: int) -> tuple[int, ...]:
    """AUTOMATIC1111's all_seeds: seed, seed + 1, ...; -1 or none draws one (32 bits, as the web UI)."""
    if seed is None or seed == -1:
        seed = random.randrange(2**32 - 1)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0 or seed + count - 1 > MAX_SEED_A1111:
        raise InvalidInput(f"seed must be -1 (random) or an integer from 0 to 2**64-{count}, got {seed!r}")
    return tuple(seed + i for i in range(count))


def _img2img_inputs(fields: Mapping[str, Any], max_pixels: int) -> tuple[dict[str, bytes], float | None]:
    inits = fields.get("init_images") or []
    if not inits:
        raise InvalidInput("init_images is empty: img2img needs one base64 image")
    if len(inits) > 1 and any(i != inits[0] for i in inits[1:]):
        raise InvalidInput(f"init_images has {len(inits)} different images; sdrt uses one per request")
    out = {"image": request_images.from_base64(inits[0], "init_images[0]", max_pixels)}
    strength = fields.get("denoising_strength")
    if strength is None:
        strength = A1111_DENOISING_STRENGTH
    mask = fields.get("mask")
    if mask:
        if fields.get("inpaint_full_res"):
            raise InvalidInput("inpaint_full_res (inpaint area: only masked) is not supported; send "
                               "inpaint_full_res: false (whole picture)")
        fill = fields.get("inpainting_fill")
        if fill not in (None, 1) and (strength is None or strength < 1):
            raise InvalidInput(f"inpainting_fill={fill} is not supported: sdrt starts the masked area from the "
                               f"original (1); with denoising_strength 1 the fill does not matter")
        blur = fields.get("mask_blur")
        bx = fields.get("mask_blur_x", blur) if fields.get("mask_blur_x") is not None else blur
        by = fields.get("mask_blur_y", blur) if fields.get("mask_blur_y") is not None else blur
        data = request_images.from_base64(mask, "mask", max_pixels)
        out["mask_image"] = request_images.a1111_mask(data, bool(fields.get("inpainting_mask_invert")),
                                                      float(bx or 0), float(by or 0))
    return out, strength


def validate(job: Job, model: Model, executor: Executor) -> None:
    """Check a job's settings against its model before it is queued, so a bad value is
    a 4xx now and not a failed job later."""
    from sdrt.runtime.inputs import load_image, load_mask

    kwargs = dict(job.settings)
    for key, data in job.images.items():
        kwargs[key] = load_mask(data) if key == "mask_image" else load_image(data, key)
    batch = model.batch
    seeds = list(job.seeds[:batch]) + [job.seeds[-1]] * max(0, batch - job.count)
    for name, _ in job.loras:
        lora_path(executor.config.lora_dir, name)
    if job.embeddings:
        kwargs["embeddings"] = [(embedding_path(executor.config.embedding_dir, n), n) for n in job.embeddings]
    model.artifact.request(seed=seeds if batch > 1 else seeds[0], **kwargs)


def response(job: Job, model: Model, fields: Mapping[str, Any], result: JobResult) -> dict[str, Any]:
    """AUTOMATIC1111's answer: images as base64 PNGs, the request's parameters, and
    `info`, a JSON string with the infotexts and seeds."""
    from sdrt.runtime import infotext

    texts = [i.parameters for i in result.images]
    first = texts[0] if texts else ""
    parsed = infotext.parse(first).fields if first else {}
    n = job.count
    prompt = job.settings.get("prompt", "")
    negative = job.settings.get("negative_prompt") or ""
    info = {
        "prompt": prompt, "all_prompts": [prompt] * n, "negative_prompt": negative,
        "all_negative_prompts": [negative] * n, "seed": job.seeds[0], "all_seeds": list(job.seeds),
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": model.width, "height": model.height, "sampler_name": parsed.get("Sampler"),
        "scheduler": parsed.get("Schedule type"), "cfg_scale": _num(parsed.get("CFG scale")),
        "steps": _num(parsed.get("Steps")), "batch_size": fields.get("batch_size") or 1, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model.name, "sd_model_hash": model.hash or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": job.settings.get("strength"), "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": job.settings.get("clip_skip", 0) + 1,
        "is_using_inpainting_conditioning": bool(model.artifact.manifest.facts.inpainting),
        "version": "sdrt", "nsfw_content_detected": [i.nsfw for i in result.images],
    }
    parameters = {k: v for k, v in fields.items() if k not in ("init_images", "mask")}
    send = fields.get("send_images", True)
    encoded = [base64.b64encode(i.png).decode("ascii") for i in result.images] if send else []
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}


def _num(text: str | None) -> Any:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


def samplers() -> list[dict[str, Any]]:
    """/sdapi/v1/samplers: the AUTOMATIC1111 names sdrt follows, then sdrt's own samplers
    that have no AUTOMATIC1111 name."""
    from sdrt.runtime.schedulers import SAMPLERS, names

    out = [{"name": label, "aliases": [sampler], "options": {}} for label, sampler in names.A1111_SAMPLERS.items()]
    known = set(names.A1111_SAMPLERS.values())
    out += [{"name": s, "aliases": [], "options": {}} for s in SAMPLERS if s not in known]
    return out


def schedulers() -> list[dict[str, Any]]:
    from sdrt.runtime.schedulers import names

    return [{"name": label.lower(), "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for label in names.A1111_SCHEDULES]


def sd_models(executor: Executor) -> list[dict[str, Any]]:
    """/sdapi/v1/sd-models; width, height and batch are sdrt's (its artifacts are static)."""
    return [{"title": m.title, "model_name": m.name, "hash": m.hash or None, "sha256": None,
             "filename": m.folder.name, "config": None, "width": m.width, "height": m.height, "batch": m.batch}
            for m in executor.models.values()]


def png_info(image_b64: str, max_pixels: int) -> dict[str, Any]:
    """/sdapi/v1/png-info: the image's text chunks, its parameters text, and that text parsed."""
    import io

    from PIL import Image

    from sdrt.runtime import infotext

    data = request_images.from_base64(image_b64, "image", max_pixels)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        items = {k: v for k, v in {**im.info, **getattr(im, "text", {})}.items() if isinstance(v, str)}
    text = items.pop("parameters", None)
    parameters: dict[str, Any] = {}
    if text:
        parsed = infotext.parse(text)
        parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.fields}
    return {"info": text or "", "items": items, "parameters": parameters}
