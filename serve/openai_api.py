"""OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`), as LLM tooling calls it.

`model` names a served model; OpenAI's own model names (dall-e-2, dall-e-3,
gpt-image-*), which tools often send fixed, pick the first served model. `size` must be
the artifact's ("WxH", or "auto"). Images come back as `b64_json` PNGs with their
AUTOMATIC1111 parameters text; `response_format: url` is refused (sdrt keeps no files).
sdrt's own fields, which the openai package passes through `extra_body`: seed (image i
gets seed + i), negative_prompt, steps, guidance_scale, sampler, clip_skip, and for
edits strength. Edits follow OpenAI's masks: the mask's fully transparent pixels (or,
without a mask, the image's own) mark the area to repaint; an opaque image with no mask
is image-to-image at `strength` (default 0.8). Errors come in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import random
import time
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict

from sdrt.engines.errors import InvalidInput

from . import images as request_images
from .a1111 import sampler_of, seeds_from, validate
from .executor import Executor, Model
from .jobs import Job, JobResult, embeddings_used

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image")


class GenerationsRequest(BaseModel):
    """OpenAI's image generation request, plus sdrt's fields (seed, negative_prompt, steps,
    guidance_scale, sampler, clip_skip)."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    model: str | None = None
    n: int | None = 1
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    background: str | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    clip_skip: int | None = None


def pick_model(executor: Executor, name: str | None) -> Model:
    if name and any(name.startswith(m) for m in OPENAI_MODELS) and name not in executor.models:
        return executor.model(None)
    return executor.model(name)


def job_from_fields(fields: Mapping[str, Any], executor: Executor, images: dict[str, bytes] | None = None
                    ) -> tuple[Job, Model]:
    config = executor.config
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput("prompt is required: the text of the image to make")
    model = pick_model(executor, fields.get("model"))
    n = _int(fields, "n", 1)
    if not 1 <= n <= config.max_images:
        raise InvalidInput(f"n={n}: this server makes 1 to {config.max_images} images per request (--max-images)")
    size = fields.get("size")
    if size not in (None, "", "auto", f"{model.width}x{model.height}"):
        raise InvalidInput(f"size={size!r}: model {model.name} generates {model.width}x{model.height} images (the "
                           f"size it was exported at); ask for '{model.width}x{model.height}' or 'auto'")
    if fields.get("response_format") not in (None, "b64_json"):
        raise InvalidInput(f"response_format={fields['response_format']!r} is not supported: sdrt returns images "
                           f"inline; ask for 'b64_json'")
    if fields.get("output_format") not in (None, "png"):
        raise InvalidInput(f"output_format={fields['output_format']!r} is not supported: sdrt returns PNG")
    if fields.get("background") not in (None, "auto", "opaque"):
        raise InvalidInput(f"background={fields['background']!r} is not supported: sdrt's images are opaque")
    if fields.get("stream") not in (None, False, "false"):
        raise InvalidInput("stream is not supported")
    settings: dict[str, Any] = {"prompt": prompt, "negative_prompt": fields.get("negative_prompt") or None}
    for ours, theirs in (("steps", "steps"), ("guidance", "guidance_scale"), ("clip_skip", "clip_skip")):
        value = fields.get(theirs)
        if value not in (None, ""):
            settings[ours] = _number(value, theirs, int if ours != "guidance" else float)
    if fields.get("sampler"):
        settings["scheduler"] = sampler_of(str(fields["sampler"]), None)
    images = dict(images or {})
    if images and fields.get("strength") not in (None, ""):
        settings["strength"] = _number(fields["strength"], "strength", float)
    seed = fields.get("seed")
    seeds = seeds_from(None if seed in (None, "") else _number(seed, "seed", int), n)
    used = embeddings_used(config.embedding_dir, [settings["prompt"], settings["negative_prompt"]])
    job = Job(model.name, settings, seeds, images, embeddings=used, id=f"img-{random.getrandbits(48):012x}")
    validate(job, model, executor)
    return job, model


def edit_images(image: bytes, mask: bytes | None, max_pixels: int) -> dict[str, bytes]:
    image = request_images.checked(image, "image", max_pixels)
    if mask is not None:
        mask = request_images.openai_mask(mask, "mask", max_pixels)
        if request_images.size_of(mask) != request_images.size_of(image):
            w, h = request_images.size_of(mask)
            iw, ih = request_images.size_of(image)
            raise InvalidInput(f"mask is {w}x{h} and image {iw}x{ih}: they must be the same size")
    else:
        mask = request_images.transparent_area(image)
    return {"image": image, **({"mask_image": mask} if mask is not None else {})}


def response(job: Job, result: JobResult) -> dict[str, Any]:
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(i.png).decode("ascii"), "revised_prompt": None}
                     for i in result.images],
            "output_format": "png"}


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded", 504: "timeout"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _int(fields: Mapping[str, Any], name: str, default: int) -> int:
    value = fields.get(name)
    return default if value in (None, "") else _number(value, name, int)


def _number(value: Any, name: str, kind: type) -> Any:
    """A number from JSON or a multipart form field (text)."""
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise InvalidInput(f"{name} must be an integer, got {value!r}")
    return number
