"""`sdrt bench`: time generation per stage on an artifact folder (the measuring is
runtime/bench.py's; the pipeline is imported when the command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.engines.progress import Progress
from sdrt.runtime.bench import DEFAULT_PROMPT, BenchConfig, format_table, run_bench

from .backends import add_backend_args, backend_request
from .errors import writing_into
from .folders import artifact_folder, check_folder_for


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="time generation per stage on an artifact folder",
        description="Warm up, then time N generations: text encoder, U-Net per step, host work "
                    "per step (step wall time minus engine time), VAE decoder and end to end "
                    "(median, p90, p99, min), images per second and peak memory.")
    p.add_argument("artifact_dir", type=Path, help="folder written by `sdrt export` (or `sdrt build`)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the artifact's, 25; 4 for an LCM model)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the artifact's, 7.5; 1 on a --no-cfg artifact, which runs "
                        "no CFG; an LCM model's embedded scale, 8.5)")
    p.add_argument("--scheduler", default=None, help="scheduler name (default: the model's)")
    p.add_argument("--deepcache", type=int, default=1, metavar="N",
                   help="DeepCache: the full U-Net every N steps, the shallow one between (default 1: off; "
                        "needs an artifact exported with --deepcache)")
    p.add_argument("--runs", type=int, default=BenchConfig.runs, help="measured generations (default 10)")
    p.add_argument("--warmup", type=int, default=BenchConfig.warmup, help="untimed generations first (default 2)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--json", type=Path, default=None, dest="json_path", metavar="FILE",
                   help="also write every figure, the machine, versions and settings to FILE")
    p.add_argument("--force", action="store_true", help="overwrite the --json FILE if it exists")
    add_backend_args(p)
    p.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from sdrt.engines.files import atomic_write_json

    backend, options = backend_request(args)
    config = BenchConfig(
        artifact_dir=args.artifact_dir, backend=backend, options=options, steps=args.steps, guidance=args.guidance,
        scheduler=args.scheduler, runs=args.runs, warmup=args.warmup, prompt=args.prompt,
        cache_interval=args.deepcache,
        json_path=args.json_path, force=args.force,
    ).validate()
    artifact_folder(config.artifact_dir)
    if config.json_path is not None:
        check_folder_for(config.json_path)   # before the runs, not after
    report = run_bench(config, progress=Progress())
    print(format_table(report))
    if config.json_path is not None:
        with writing_into(config.json_path):
            atomic_write_json(config.json_path, report)
        print(f"wrote {config.json_path}")
    return 0
