"""`sdrt serve`: an HTTP server over one or more artifact folders (serve/app.py).

argparse stops here: the flags become a ServeConfig. The server binds at once and
loads the engines in the background; /v2/health/ready turns true when they are loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdrt.engines.errors import BackendUnavailable

from .backends import add_backend_args, backend_request

MB = 2**20


def register(sub: argparse._SubParsersAction) -> None:
    from sdrt.serve.config import (DEFAULT_BATCH_WAIT_MS, DEFAULT_DEADLINE_S, DEFAULT_HOST, DEFAULT_MAX_BODY_MB,
                                   DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, DEFAULT_MAX_QUEUE, DEFAULT_PORT)

    s = sub.add_parser(
        "serve", help="serve artifact folders over HTTP (AUTOMATIC1111's and OpenAI's image APIs)",
        description="Serve one or more artifact folders over HTTP. Endpoints: AUTOMATIC1111's web UI API "
                    "(/sdapi/v1/txt2img, img2img, samplers, sd-models, progress, interrupt, png-info), OpenAI's "
                    "Images API (/v1/images/generations, /v1/images/edits), /v2/health/live and /ready, "
                    "/metrics (Prometheus), interactive API docs at /docs and a web page at /. A request picks "
                    "a model by name (AUTOMATIC1111's override_settings.sd_model_checkpoint, OpenAI's model); "
                    "default: the first. Needs the serve extra: pip install 'sdrt[serve]'.")
    s.add_argument("artifacts", metavar="ARTIFACT_DIR", nargs="+", type=Path, help="artifact folders to serve")
    s.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}, this machine only); any other address needs "
                        f"--api-key or --insecure-no-auth")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, AUTOMATIC1111's)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but health (browsers: HTTP Basic "
                        "with KEY as the password). Also read from the SDRT_API_KEY environment variable, "
                        "which keeps it out of the process list")
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --api-key (when a proxy in front controls access)")
    s.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"jobs that may wait; more get 429 with Retry-After (default {DEFAULT_MAX_QUEUE})")
    s.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="SECONDS",
                   help=f"a request not answered within this is dropped from the queue or stopped between "
                        f"steps, with 504 (default {DEFAULT_DEADLINE_S:g})")
    s.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS, metavar="MS",
                   help=f"artifacts exported with --batch N: wait up to this for compatible requests to fill "
                        f"an engine call (default {DEFAULT_BATCH_WAIT_MS:g})")
    s.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, metavar="N",
                   help=f"images per request, at most (default {DEFAULT_MAX_IMAGES})")
    s.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                   help=f"request body limit (default {DEFAULT_MAX_BODY_MB:g}); larger bodies get 413")
    s.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"input image limit in pixels, read from its header before decoding "
                        f"(default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    s.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                   help="LoRAs a request may name (<lora:NAME:WEIGHT> in an AUTOMATIC1111 prompt): NAME.safetensors "
                        "inside DIR; requests never give paths")
    s.add_argument("--embedding-dir", type=Path, default=None, metavar="DIR",
                   help="textual-inversion embeddings (.safetensors) a prompt may use: as in the web UI, a file's "
                        "name without the extension, written in the prompt or negative prompt, is its trigger")
    s.add_argument("--cors-origin", dest="cors_origins", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. https://app.example.com) to call the API; "
                        "repeatable. Default: no CORS")
    s.add_argument("--log-prompts", action="store_true", help="log each job's prompt (not logged by default)")
    s.add_argument("--queue", dest="queue_url", default=None, metavar="redis://HOST:PORT/DB",
                   help="run jobs on `sdrt worker` processes through Celery with this Redis broker, instead "
                        "of in this process (the artifact folders here are read for their settings only)")
    add_backend_args(s)
    s.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import os

    try:
        import uvicorn

        from sdrt.serve.app import create_app
        from sdrt.serve.config import ServeConfig
    except ImportError as e:
        raise BackendUnavailable(f"sdrt serve needs the serve extra ({e.name} is missing): "
                                 f"pip install 'sdrt[serve]'") from None
    backend, options = backend_request(args)
    config = ServeConfig(
        artifacts=tuple(args.artifacts), host=args.host, port=args.port, backend=backend,
        backend_options=options, max_queue=args.max_queue, deadline_s=args.deadline,
        batch_wait_ms=args.batch_wait_ms, max_body_bytes=int(args.max_body_mb * MB),
        max_image_pixels=args.max_image_pixels, max_images=args.max_images,
        api_key=args.api_key or os.environ.get("SDRT_API_KEY") or None, insecure_no_auth=args.insecure_no_auth,
        cors_origins=tuple(args.cors_origins), log_prompts=args.log_prompts, lora_dir=args.lora_dir,
        embedding_dir=args.embedding_dir,
        queue_url=args.queue_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    app = create_app(config)
    print(f"sdrt serve: http://{_url_host(config.host)}:{config.port}/ ({len(config.artifacts)} model"
          f"{'s' * (len(config.artifacts) > 1)}: {', '.join(app.state.executor.models)}; loading in the "
          f"background, ready at /v2/health/ready)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, access_log=False, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
