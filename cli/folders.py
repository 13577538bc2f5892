"""The folders a command is given, checked before any work: a diffusers checkpoint
where an artifact folder belongs (a mistake the library cannot name), and an output
whose folder is a file."""

from __future__ import annotations

import shlex
from pathlib import Path

from sdrt.engines.errors import InvalidInput
from sdrt.engines.manifest import MANIFEST_NAME

CHECKPOINT_INDEX = "model_index.json"    # what every diffusers pipeline folder has


def artifact_folder(folder: Path) -> Path:
    """`folder`, unless it is a diffusers checkpoint (model_index.json, no manifest):
    then say how to make an artifact folder from it. Anything else wrong with it
    (missing, incomplete, damaged) is for the manifest reader to say."""
    if (folder / CHECKPOINT_INDEX).is_file() and not (folder / MANIFEST_NAME).exists():
        raise InvalidInput(f"{folder} is a diffusers checkpoint, not an sdrt artifact folder: export it first "
                           f"with `sdrt export {shlex.quote(str(folder))} --out DIR`")
    return folder


def check_folder_for(out: Path) -> None:
    """The output's folder must be a folder (or not exist yet), checked before the work."""
    for parent in (out.parent, *out.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInput(f"cannot write {out}: {parent} is a file, not a folder")
            return
