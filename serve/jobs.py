"""A generation request as the server's queue carries it, and how a loaded pipeline runs it.

The HTTP layers (a1111.py, openai_api.py) turn a request into a `Job`: the
`Pipeline.__call__` settings of its images, one seed per image, and its input images
as encoded bytes. A job is plain data (JSON for the Celery queue, see `to_json`), and
`run_items` is the one place that turns job items into pipeline calls, whether the
pipeline runs in the server's process (local.py) or in a `sdrt worker` (remote.py);
so a request gives the pixels `sdrt generate` gives with the same settings and seed.

A request for n images is n items with seeds seed, seed+1, ... (AUTOMATIC1111's
`all_seeds`). An artifact exported with `--batch N` runs N items per engine call, from
one request or several compatible ones (`batch_key`), each item with its own seed
(diffusers' list of generators), padded with copies of the last item when fewer are
waiting; so an item's pixels do not depend on what it was batched with.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import PngImagePlugin

from sdrt.engines.errors import InvalidInput, SdrtError

# The settings that may differ between the items of one engine call.
PER_ITEM = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")
IMAGE_KEYS = ("image", "mask_image")
LORA_SUFFIX = ".safetensors"


class Stopped(SdrtError):
    """A job stopped before it finished: interrupted, past its deadline, or its client left."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason   # "interrupted", "deadline" or "disconnected"


@dataclass(frozen=True)
class Job:
    """One request's images. `settings` are `Pipeline.__call__` keyword arguments
    (JSON values) without seed and input images; `images` are the encoded input
    images by argument name; `loras` are (name, scale) pairs, names of files inside
    the runner's --lora-dir (never paths from a request)."""

    model: str
    settings: Mapping[str, Any]
    seeds: tuple[int, ...]
    images: Mapping[str, bytes] = field(default_factory=dict)
    loras: tuple[tuple[str, float], ...] = ()
    embeddings: tuple[str, ...] = ()   # names of files in the runner's --embedding-dir, each its own trigger
    deadline: float | None = None   # time.time() after which the job is dropped or stopped
    timeout: float | None = None    # the seconds that deadline allowed, for messages
    id: str = ""

    def __post_init__(self):
        if not self.seeds:
            raise InvalidInput("a job needs at least one image")

    @property
    def count(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> str:
        """Jobs with the same key may share an engine call (same model, steps, sampler,
        guidance, size, input images and LoRAs; prompts and seeds may differ)."""
        common = {k: v for k, v in self.settings.items() if k not in PER_ITEM}
        images = {k: hashlib.sha256(v).hexdigest() for k, v in self.images.items()}
        if "mask_image" in self.images:
            # diffusers' inpainting samples the image latents from the first generator
            # only, so an inpainted item depends on its batch: never batched with others.
            images["job"] = self.id or str(id(self))
        return json.dumps([self.model, common, images, self.loras, self.embeddings], sort_keys=True, default=str)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "settings": dict(self.settings), "seeds": list(self.seeds),
                "images": {k: base64.b64encode(v).decode("ascii") for k, v in self.images.items()},
                "loras": [list(x) for x in self.loras], "embeddings": list(self.embeddings),
                "deadline": self.deadline, "timeout": self.timeout, "id": self.id}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Job":
        return cls(data["model"], dict(data["settings"]), tuple(int(s) for s in data["seeds"]),
                   {k: base64.b64decode(v) for k, v in data.get("images", {}).items()},
                   tuple((str(n), float(s)) for n, s in data.get("loras", ())),
                   tuple(str(n) for n in data.get("embeddings", ())), data.get("deadline"), data.get("timeout"),
                   data.get("id", ""))


@dataclass(frozen=True)
class Item:
    """One image of a job: the job and the image's index in it."""

    job: Job
    index: int

    @property
    def seed(self) -> int:
        return self.job.seeds[self.index]


@dataclass(frozen=True)
class ImageOut:
    png: bytes          # the PNG, with its `parameters` text chunk
    seed: int
    parameters: str     # AUTOMATIC1111's parameters text
    nsfw: bool | None   # the safety checker's verdict, None when none ran


@dataclass
class JobResult:
    images: list[ImageOut]
    # seconds per stage summed over the job's engine calls (the calls' shares when batched)
    stages: dict[str, float] = field(default_factory=dict)
    queue_wait: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"images": [{"png": base64.b64encode(i.png).decode("ascii"), "seed": i.seed,
                            "parameters": i.parameters, "nsfw": i.nsfw} for i in self.images],
                "stages": self.stages, "queue_wait": self.queue_wait}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "JobResult":
        return cls([ImageOut(base64.b64decode(i["png"]), int(i["seed"]), i["parameters"], i["nsfw"])
                    for i in data["images"]], dict(data.get("stages", {})), float(data.get("queue_wait", 0.0)))


def items_of(jobs: Sequence[Job]) -> list[Item]:
    return [Item(job, i) for job in jobs for i in range(job.count)]


def lora_path(lora_dir: Path | None, name: str) -> Path:
    """The file of LoRA `name` inside `lora_dir`: a plain name (the extension optional),
    never a path; refused when no --lora-dir is set or no such file exists."""
    return named_file(lora_dir, name, "LoRA", "--lora-dir", "GET /sdapi/v1/loras lists them")


def embedding_path(folder: Path | None, name: str) -> Path:
    return named_file(folder, name, "embedding", "--embedding-dir", "GET /sdapi/v1/embeddings lists them")


def named_file(folder: Path | None, name: str, kind: str, flag: str, listed: str) -> Path:
    """NAME.safetensors inside the server's `folder`; a request names files, never paths."""
    if folder is None:
        raise InvalidInput(f"{kind} {name!r}: this server has no {flag}, so it serves no {kind}s")
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or ":" in name
            or name.startswith(".")):
        raise InvalidInput(f"{kind} name {name!r} is not a plain file name inside the server's {kind} folder")
    path = folder / (name if name.endswith(LORA_SUFFIX) else name + LORA_SUFFIX)
    resolved = path.resolve()
    if resolved.parent != folder.resolve() or not resolved.is_file():
        raise InvalidInput(f"no {kind} named {name!r} in the server's {kind} folder ({listed})")
    return resolved


def embeddings_used(folder: Path | None, texts: Sequence[str | None]) -> tuple[str, ...]:
    """The embeddings in `folder` whose name (the file's, without .safetensors: the web
    UI's trigger) appears as a word in one of `texts`."""
    if folder is None:
        return ()
    import re

    joined = "\n".join(t for t in texts if t)
    return tuple(p.stem for p in sorted(folder.glob("*" + LORA_SUFFIX))
                 if p.is_file() and re.search(rf"(?<![\w-]){re.escape(p.stem)}(?![\w-])", joined))


def run_items(pipe: Any, items: Sequence[Item], lora_dir: Path | None = None,
              on_step: Callable[[int, int], None] | None = None, embedding_dir: Path | None = None
              ) -> tuple[list[ImageOut], dict[str, float], list[int]]:
    """Generate `items` (all with the same `batch_key`) on a loaded Pipeline, `pipe.batch`
    at a time; return one ImageOut per item, in order, the seconds per stage, and the
    number of items in each engine call."""
    from sdrt.runtime.inputs import load_image, load_mask

    job = items[0].job
    kwargs = dict(job.settings)
    for key, data in job.images.items():
        kwargs[key] = load_mask(data) if key == "mask_image" else load_image(data, key)
    if job.loras:
        kwargs["loras"] = [(str(lora_path(lora_dir, name)), scale) for name, scale in job.loras]
    if job.embeddings:
        kwargs["embeddings"] = [(str(embedding_path(embedding_dir, name)), name) for name in job.embeddings]
    out: list[ImageOut] = []
    stages: dict[str, float] = {}
    fills: list[int] = []
    n = pipe.batch
    for start in range(0, len(items), n):
        chunk = list(items[start:start + n])
        real = len(chunk)
        fills.append(real)
        chunk += [chunk[-1]] * (n - real)   # a static batch: pad with copies, dropped below
        call = dict(kwargs)
        for key in PER_ITEM:
            values = [it.job.settings.get(key) for it in chunk]
            if any(v is not None for v in values):
                call[key] = values if n > 1 else values[0]
        seeds = [it.seed for it in chunk]
        result = pipe(seed=seeds if n > 1 else seeds[0], on_step=on_step, **call)
        t = result.timings
        for name, seconds in (("text_encoder", t.text_encoder), ("vae_encoder", t.vae_encoder),
                              ("unet", sum(t.steps)), ("vae_decoder", t.vae_decoder),
                              ("safety_checker", t.safety_checker), ("total", t.total)):
            stages[name] = stages.get(name, 0.0) + seconds * real / n
        nsfw = result.nsfw_content_detected
        for i in range(real):
            image = result.images[i]
            text = image.info.get("parameters", "")
            out.append(ImageOut(png_bytes(image, text), chunk[i].seed, text, None if nsfw is None else bool(nsfw[i])))
    return out, stages, fills


def png_bytes(image: Any, parameters: str) -> bytes:
    """A PNG with AUTOMATIC1111's `parameters` text chunk, as `sdrt generate` writes it."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def with_deadline(job: Job, seconds: float | None) -> Job:
    return job if seconds is None else dataclasses.replace(job, deadline=time.time() + seconds, timeout=seconds)


def deadline_passed(job: Job, where: str) -> Stopped:
    return Stopped("deadline", f"the request's deadline of {job.timeout or 0:g} s passed while the job was {where}")
