"""`sdrt demo`: make the built-in tiny model, export it, generate an image, in one
command. Needs the export extra (torch), imported when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.engines.errors import AlreadyExists, BackendUnavailable, InvalidInput, SdrtError
from sdrt.engines.progress import Progress

from .backends import add_backend_args, backend_request
from .errors import writing_into
from .generate import DEFAULT_PROMPT, add_generation_args, check_request, generate_and_save, generation_request

DEFAULT_DEMO_DIR = "sdrt-demo"
DEMO_IMAGE = "demo.png"
DEMO_MODEL = "sdrt-tiny-sd15"


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="make the built-in tiny model, export it and generate an image",
                       description="End to end in one command: write the built-in tiny SD 1.5 model, export "
                                   "it to ONNX (or reuse a complete earlier export in the folder), generate "
                                   "an image and print the timings. Needs the export extra (torch).")
    d.add_argument("--out", type=Path, default=Path(DEFAULT_DEMO_DIR),
                   help=f"folder for the model, artifacts and image (default: ./{DEFAULT_DEMO_DIR})")
    add_generation_args(d, default_prompt=DEFAULT_PROMPT)
    d.add_argument("--force", action="store_true", help=f"overwrite {DEMO_IMAGE} in a folder the demo did not make")
    add_backend_args(d)
    d.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    try:
        from sdrt.export.config import ExportConfig
        from sdrt.export.exporter import export_artifacts
        from sdrt.export.tiny import make_tiny_model
    except ImportError as e:
        raise BackendUnavailable(f"sdrt demo needs the export extra ({e.name} is missing): "
                                 f"pip install 'sdrt[export]'") from None
    from sdrt.engines.manifest import MANIFEST_NAME
    from sdrt.runtime.images import output_paths

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file; the demo needs a folder (it writes model/, artifacts/ and {DEMO_IMAGE})")
    model_dir, artifact_dir = out / "model", out / "artifacts"
    image = out / DEMO_IMAGE
    # The demo's own folder (recognised by its export) may be reused and its image
    # replaced; anything else is the user's file.
    ours = (artifact_dir / MANIFEST_NAME).is_file()
    if image.exists() and not ours and not args.force:
        raise AlreadyExists(f"{image} already exists; pass --force to overwrite it")
    backend, options = backend_request(args)
    request = generation_request(args)
    check_request(request, batch=1)
    progress = Progress()   # one clock for the whole demo: it reads as one log
    with writing_into(out):
        if not _complete_export(artifact_dir):
            if not (model_dir / "model_index.json").is_file():
                progress.say(f"writing the built-in tiny SD 1.5 model to {model_dir}")
                make_tiny_model(model_dir, variant="sd15", force=model_dir.exists())
            progress.say(f"exporting it to ONNX in {artifact_dir}")
            export_artifacts(ExportConfig(model_dir=model_dir, out_dir=artifact_dir, force=artifact_dir.exists(),
                                          model_name=DEMO_MODEL), progress)
        else:
            progress.say(f"reusing the export in {artifact_dir}")
        generate_and_save(artifact_dir, backend, options, request, output_paths(image, 1),
                          command=args.command, progress=progress)
    progress.say("demo done")
    return 0


def _complete_export(folder: Path) -> bool:
    from sdrt.engines.manifest import load_manifest

    try:
        load_manifest(folder)
        return True
    except SdrtError:
        return False
