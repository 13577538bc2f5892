"""The artifact manifest: what an artifact folder holds and how to trust it.

`manifest.json` is written last by export, so a folder without one is incomplete by
definition. It records the source model's facts and the chosen shapes (from which
`specs.stage_specs` derives every tensor), each stage's precision, a SHA-256 and size
for every file the runtime reads, tool versions and export's verification results.

Loading checks sizes always and content hashes unless a stamp proves the file is
unchanged since it was last hashed (see `_Stamps`), so a normal load of a multi-GB
U-Net does not re-read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import files
from .errors import ArtifactError, MissingFile
from .specs import ModelFacts, Precision, ShapeConfig, Stage, StageSpec, stage_specs

MANIFEST_NAME = "manifest.json"
FORMAT = "sdrt-artifacts"
FORMAT_VERSION = 1
STAMPS_NAME = ".sdrt-verified.json"


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    facts: ModelFacts
    shape: ShapeConfig
    precisions: Mapping[Stage, Precision]
    files: Mapping[str, FileRecord]            # path relative to the folder -> record
    tools: Mapping[str, str] = field(default_factory=dict)
    verification: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def specs(self) -> dict[Stage, StageSpec]:
        return stage_specs(self.facts, self.shape)

    def to_json(self) -> dict[str, Any]:
        specs = self.specs
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "model": self.facts.to_json(),
            "shape": self.shape.to_json(),
            "stages": {
                s.value: {
                    "file": s.onnx_file,
                    **({"data_file": s.data_file} if s.data_file else {}),
                    "precision": self.precisions[s].value,
                    **specs[s].to_json(),
                }
                for s in Stage
            },
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "tools": dict(self.tools),
            "verification": dict(self.verification),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        try:
            if data.get("format") != FORMAT:
                raise ArtifactError(f"{where}: not an sdrt manifest (format {data.get('format')!r})")
            if data.get("format_version") != FORMAT_VERSION:
                raise ArtifactError(
                    f"{where}: format version {data.get('format_version')!r} is not supported "
                    f"(this sdrt reads {FORMAT_VERSION}); export the model again")
            facts = ModelFacts.from_json(data["model"])
            shape = ShapeConfig.from_json(data["shape"])
            precisions = {s: Precision(data["stages"][s.value]["precision"]) for s in Stage}
            records = {str(k): FileRecord(str(v["sha256"]), int(v["size"])) for k, v in data["files"].items()}
            manifest = cls(facts, shape, precisions, records, dict(data.get("tools", {})),
                           dict(data.get("verification", {})), str(data.get("source", "")))
            stated = {s.value: {k: data["stages"][s.value][k] for k in ("inputs", "outputs")} for s in Stage}
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            raise ArtifactError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        # The stated tensor specs must be the ones the facts and shapes imply; a
        # hand-edited shape would otherwise only fail deep inside an engine.
        for stage, spec in manifest.specs.items():
            if stated[stage.value] != spec.to_json():
                raise ArtifactError(
                    f"{where}: the {stage.value} tensor specs do not match its model and shape "
                    f"settings (stated {stated[stage.value]}, expected {spec.to_json()})")
        for stage in Stage:
            for name in (stage.onnx_file, stage.data_file):
                if name and name not in records:
                    raise ArtifactError(f"{where}: no file record for {name}")
        return manifest


def file_record(folder: Path, relpath: str) -> FileRecord:
    path = folder / relpath
    return FileRecord(files.sha256_file(path), path.stat().st_size)


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write the manifest (atomically, last) and stamp the files as just hashed."""
    folder = Path(folder)
    files.atomic_write_json(folder / MANIFEST_NAME, manifest.to_json())
    _Stamps(folder).save_for(manifest.files)


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Parse the manifest without checking the files (for `sdrt info`)."""
    folder = _existing_folder(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is incomplete: it has no {MANIFEST_NAME} (export did not finish, "
            f"or this is not an sdrt artifact folder); run `sdrt export` again")
    data = files.read_json_object(path, ArtifactError, "manifest")
    return Manifest.from_json(data, where=str(path))


def load_manifest(folder: str | os.PathLike[str], check_hashes: bool = True) -> Manifest:
    """Parse the manifest and check every file it lists against its size and hash."""
    folder = _existing_folder(folder)
    manifest = read_manifest(folder)
    check_files(folder, manifest.files, check_hashes=check_hashes)
    return manifest


def check_files(folder: Path, records: Mapping[str, FileRecord], check_hashes: bool = True) -> None:
    stamps = _Stamps(folder)
    changed = False
    for rel, rec in records.items():
        path = _inside(folder, rel)
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST_NAME})")
        size = path.stat().st_size
        if size != rec.size:
            raise ArtifactError(f"{path}: size {size} bytes, manifest says {rec.size} (truncated or replaced)")
        if check_hashes and not stamps.unchanged(rel, path, rec.sha256):
            digest = files.sha256_file(path)
            if digest != rec.sha256:
                raise ArtifactError(f"{path}: content hash does not match {MANIFEST_NAME} (file corrupt or modified)")
            stamps.record(rel, path, digest)
            changed = True
    if changed:
        stamps.save()


def _existing_folder(folder: str | os.PathLike[str]) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise MissingFile(f"artifact folder {folder} does not exist")
    if not folder.is_dir():
        raise MissingFile(f"{folder} is not a folder")
    return folder


def _inside(folder: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing any that leaves the folder (../, absolute, symlink out)."""
    if "\x00" in rel:   # os.path would raise a bare ValueError on it
        raise ArtifactError(f"{MANIFEST_NAME}: file name {rel!r} contains a NUL byte")
    path = folder / rel
    root = folder.resolve()
    resolved = path.resolve()
    if os.path.isabs(rel) or (resolved != root and root not in resolved.parents):
        raise ArtifactError(f"{MANIFEST_NAME}: file {rel!r} points outside {folder}")
    return path


class _Stamps:
    """Remembers (size, mtime, ctime, inode) of files whose hash was checked.

    Any write to a file changes its ctime, which user space cannot set back, so a
    matching stamp proves the content is the content that was hashed. A copied or
    edited folder has no matching stamps and is fully re-hashed once.
    """

    def __init__(self, folder: Path):
        self.path = folder / STAMPS_NAME
        self.folder = folder
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries: dict[str, Any] = data if isinstance(data, dict) else {}
        except (OSError, ValueError, RecursionError):
            self.entries = {}

    @staticmethod
    def _key(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def unchanged(self, rel: str, path: Path, sha256: str) -> bool:
        entry = self.entries.get(rel)
        return isinstance(entry, dict) and entry.get("sha256") == sha256 and entry.get("stat") == self._key(path)

    def record(self, rel: str, path: Path, sha256: str) -> None:
        self.entries[rel] = {"sha256": sha256, "stat": self._key(path)}

    def save_for(self, records: Mapping[str, FileRecord]) -> None:
        self.entries = {}
        for rel, rec in records.items():
            self.record(rel, self.folder / rel, rec.sha256)
        self.save()

    def save(self) -> None:
        try:
            files.atomic_write_json(self.path, self.entries)
        except OSError:
            pass  # a read-only artifact folder is fine: it is just hashed on every load
