"""The artifact folder before export writes into it: never lose a user's files, and
never let an interrupted export look complete (the manifest is the completion mark,
written last and removed first)."""

from __future__ import annotations

import shutil
from pathlib import Path

from sdrt.engines.errors import AlreadyExists
from sdrt.engines.files import TEMP_PREFIX
from sdrt.engines.manifest import MANIFEST_NAME, STAMPS_NAME
from sdrt.engines.progress import Progress
from sdrt.engines.specs import Stage

TOKENIZER_DIR = "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"   # SDXL
SCHEDULER_DIR = "scheduler"


def export_names() -> set[str]:
    """Top-level names an sdrt export writes."""
    names = {MANIFEST_NAME, STAMPS_NAME, TOKENIZER_DIR, TOKENIZER_2_DIR, SCHEDULER_DIR}
    for s in Stage:
        names.add(s.onnx_file)
        if s.data_file:
            names.add(s.data_file)
    return names


def prepare(out_dir: Path, force: bool, progress: Progress) -> None:
    """Make `out_dir` ready for a fresh export, or refuse with AlreadyExists."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AlreadyExists(f"output {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = export_names()
    entries = list(out_dir.iterdir())
    leftovers = [p for p in entries if p.name in ours or p.name.startswith(TEMP_PREFIX)]
    foreign = sorted(p.name for p in entries if p not in leftovers)
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists():
        if not force:
            raise AlreadyExists(f"{out_dir} already holds exported artifacts ({MANIFEST_NAME}); "
                                f"pass --force to replace them, or choose another --out folder")
        # First, so a forced re-export that dies half-way is not taken for complete.
        manifest.unlink()
        progress.say(f"--force: replacing the artifacts in {out_dir}")
    elif foreign and not force:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise AlreadyExists(f"{out_dir} holds files sdrt did not write ({shown}); choose an empty or new "
                            f"--out folder, or pass --force to export into it anyway")
    elif leftovers:
        progress.say(f"found leftovers of an interrupted export in {out_dir}; exporting again")
    # Only sdrt's own names are removed; a user's other files are never touched.
    for p in leftovers:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
