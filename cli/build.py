"""`sdrt build`: TensorRT engines for an artifact folder. The work is in
engines/build.py, imported when the command runs, so `sdrt --help` never loads TensorRT."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.engines.specs import Stage

from .errors import writing_into
from .folders import artifact_folder


def register(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser(
        "build", help="build TensorRT engines for an artifact folder (NVIDIA GPU)",
        description="Build one TensorRT engine per stage of an exported artifact folder into "
                    "ARTIFACT_DIR/engines/, with a persistent timing cache. An engine already built for "
                    "this ONNX graph, TensorRT version and GPU is reused; one built for another is "
                    "rebuilt. Afterwards each engine is checked against ONNX Runtime on the same inputs. "
                    "Needs TensorRT and cuda-bindings: see README, GPU section.")
    build.add_argument("artifact_dir", type=Path, metavar="ARTIFACT_DIR", help="folder written by `sdrt export`")
    build.add_argument("--workspace-gb", type=float, default=4.0,
                       help="TensorRT scratch-memory limit while building, in GB (default: 4; "
                            "use 1-2 on 8 GB Jetson boards)")
    build.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), metavar="0-5",
                       help="builder optimization level: higher builds slower and may run faster (default: 3)")
    build.add_argument("--timing-cache", type=Path, metavar="PATH",
                       help="timing cache file to read and update (default: ARTIFACT_DIR/engines/timing.cache)")
    build.add_argument("--stages", nargs="+", metavar="STAGE", choices=[s.value for s in Stage],
                       help=f"stages to build (default: every stage of the artifact; "
                            f"from {', '.join(s.value for s in Stage)})")
    build.add_argument("--force", action="store_true", help="rebuild engines that are current")
    build.add_argument("--no-verify", dest="verify", action="store_false",
                       help="skip the TensorRT vs ONNX Runtime check")
    build.add_argument("--device", type=int, default=0, help="GPU index (default: 0)")
    build.add_argument("--refittable", action="store_true",
                       help="build the text encoder and U-Net engines refittable, so `generate --lora` can "
                            "change their weights after loading (rebuilds engines that are not)")
    build.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from sdrt.engines.cache import engine_dir
    from sdrt.engines.build import BuildConfig, build_engines, parse_stages

    config = BuildConfig(
        artifact_dir=artifact_folder(args.artifact_dir), workspace_gb=args.workspace_gb, opt_level=args.opt_level,
        timing_cache=args.timing_cache, force=args.force, stages=parse_stages(args.stages),
        verify=args.verify, device=args.device, refittable=args.refittable,
    )
    with writing_into(engine_dir(config.artifact_dir)):
        report = build_engines(config)
    built = ", ".join(s.value for s in report.built) or "none"
    reused = ", ".join(s.value for s in report.reused) or "none"
    print(f"engines built: {built}; reused: {reused}")
    if report.checks and not report.passed:
        failed = ", ".join(c.stage.value for c in report.checks if not c.passed)
        print(f"verification FAILED for {failed}: the engines are kept, but check the table above")
        return 1
    return 0
