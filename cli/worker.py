"""`sdrt worker`: run the jobs of `sdrt serve --queue` on this machine's engines."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdrt.engines.errors import BackendUnavailable

from .backends import add_backend_args, backend_request

VISIBILITY_TIMEOUT_S = 300.0   # serve/redis_protocol.py's default, restated so --help needs no Celery import


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "worker", help="run the jobs of `sdrt serve --queue` (Celery with Redis) on this machine's engines",
        description="Load the artifact folders' engines and run the jobs that `sdrt serve ART --queue URL` puts on "
                    "their queues (Celery, with Redis as broker and result backend), one job at a time: start one "
                    "per GPU or engine set, on as many machines as you like; each takes a job when it is free. A "
                    "worker killed mid-job loses nothing: its job goes back on the queue after "
                    "--visibility-timeout and another worker runs it, once. SIGTERM or Ctrl-C: finish the current "
                    "job, then stop (a second Ctrl-C puts the job back on its queue at once, for another worker). "
                    "The artifact folders must be copies of the server's, --lora-dir and --embedding-dir copies of "
                    "its folders. Needs the serve extra: pip install 'sdrt[serve]'.")
    s.add_argument("artifacts", metavar="ARTIFACT_DIR", nargs="+", type=Path,
                   help="artifact folders whose jobs this worker runs (the server's, by model name and hash)")
    s.add_argument("--queue", dest="queue_url", required=True, metavar="redis://HOST:PORT/DB",
                   help="the Redis URL given to `sdrt serve --queue` (rediss:// for TLS; a password as "
                        "redis://:PASSWORD@HOST:PORT/DB)")
    s.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                   help="the LoRAs requests may name: a copy of the server's --lora-dir")
    s.add_argument("--embedding-dir", type=Path, default=None, metavar="DIR",
                   help="the textual-inversion embeddings prompts may name: a copy of the server's --embedding-dir")
    s.add_argument("--visibility-timeout", type=float, default=VISIBILITY_TIMEOUT_S, metavar="SECONDS",
                   help=f"a job taken by a worker that died comes back on the queue after this (default "
                        f"{VISIBILITY_TIMEOUT_S:g}). Keep it above the longest job (a running job outliving it is "
                        f"handed out again, and the worker that gets it waits for the first to finish) and under "
                        f"the server's --deadline (or a lost job comes back after its client got 504). Give every "
                        f"worker the same value")
    add_backend_args(s)
    s.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("celery", "redis", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailable(f"sdrt worker needs the serve extra ({', '.join(missing)} missing): "
                                 f"pip install 'sdrt[serve]'")
    from sdrt.serve.worker import Worker, WorkerConfig

    backend, options = backend_request(args)
    config = WorkerConfig(artifacts=tuple(args.artifacts), queue_url=args.queue_url, backend=backend,
                          backend_options=options, lora_dir=args.lora_dir, embedding_dir=args.embedding_dir,
                          visibility_timeout_s=args.visibility_timeout)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    worker = Worker(config)   # reaches Redis first: a wrong URL fails before the engines load
    worker.load()
    return worker.run()
