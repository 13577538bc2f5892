"""`sdrt serve`'s settings: one frozen record, built once by the CLI (cli/serve.py) or a test."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sdrt.engines.errors import InvalidInput

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860                 # AUTOMATIC1111's, so its clients find sdrt where they look
DEFAULT_MAX_QUEUE = 32
DEFAULT_DEADLINE_S = 600.0
DEFAULT_MAX_BODY_MB = 64.0          # an 8192x8192 PNG in base64 fits
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGES = 16             # images per request (AUTOMATIC1111's batch_size x n_iter, OpenAI's n)
DEFAULT_BATCH_WAIT_MS = 50.0


@dataclass(frozen=True)
class ServeConfig:
    artifacts: tuple[Path, ...]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    backend: str = "onnxruntime"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    max_queue: int = DEFAULT_MAX_QUEUE
    deadline_s: float = DEFAULT_DEADLINE_S
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    api_key: str | None = None
    insecure_no_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    log_prompts: bool = False
    lora_dir: Path | None = None
    embedding_dir: Path | None = None
    queue_url: str | None = None       # redis://...: run jobs on Celery workers (remote.py)
    check_hashes: bool = True

    def __post_init__(self):
        if not self.artifacts:
            raise InvalidInput("name at least one artifact folder to serve")
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"--port must be 0..65535, got {self.port}")
        for name, value, low in (("--max-queue", self.max_queue, 1), ("--max-images", self.max_images, 1),
                                 ("--max-image-pixels", self.max_image_pixels, 64 * 64),
                                 ("--max-body-mb", self.max_body_bytes, 2**16)):
            if value < low:
                raise InvalidInput(f"{name} must be at least {low}, got {value}")
        if not self.deadline_s > 0:
            raise InvalidInput(f"--deadline must be a positive number of seconds, got {self.deadline_s}")
        if not 0 <= self.batch_wait_ms <= 60_000:
            raise InvalidInput(f"--batch-wait-ms must be 0..60000, got {self.batch_wait_ms}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise InvalidInput("--api-key must be at least 8 characters")
        for flag, folder in (("--lora-dir", self.lora_dir), ("--embedding-dir", self.embedding_dir)):
            if folder is not None and not folder.is_dir():
                raise InvalidInput(f"{flag} {folder} is not a folder")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure_no_auth:
            raise InvalidInput(f"--host {self.host} is not a loopback address: anyone who can reach it could use "
                               f"this server. Pass --api-key KEY (clients send 'Authorization: Bearer KEY'), "
                               f"or --insecure-no-auth if the network in front of it controls access")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost'; 0.0.0.0 and '::' (every interface) are not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a host name: it may resolve anywhere
