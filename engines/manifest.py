"""The artifact manifest: what an artifact folder holds and how to trust it.

`manifest.json` is written last by export, so a folder without one is incomplete by
definition. It records the model family, the source model's facts and the chosen
shapes (from which `specs.stage_specs` derives every tensor), the artifact's stage
list with each stage's specs and precision, a SHA-256 and size for every file the
runtime reads, tool versions and export's verification results.

Format 2 lists the stages (format 1, written by sdrt 0.1, always had the same three:
text encoder, U-Net, VAE decoder); both are read, and format 2 is written. An optional
"checkpoint" entry names the source checkpoint as PNG metadata records it (its name and
AUTOMATIC1111's model hash); manifests written before it existed lack it.

Loading checks sizes always and content hashes unless a stamp proves the file is
unchanged since it was last hashed (see `_Stamps`), so a normal load of a multi-GB
U-Net does not re-read it.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import files
from .errors import ArtifactError, InvalidInput, MissingFile
from .families import Family, family
from .specs import ModelFacts, Precision, ShapeConfig, Stage, StageSpec, stage_specs

MANIFEST_NAME = "manifest.json"
FORMAT = "sdrt-artifacts"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
# What every format-1 folder holds, in order.
FORMAT_1_STAGES = (Stage.TEXT_ENCODER, Stage.UNET, Stage.VAE_DECODER)
STAMPS_NAME = ".sdrt-verified.json"


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


# AUTOMATIC1111's infotext separates fields with ", " and a key from its value with ":",
# so a name holding either (or a line break) would be read back as other fields;
# a '"' could make it look like a JSON-quoted value.
_NAME_BREAKERS = frozenset(',:"')
# A Hugging Face hub cache snapshot: .../models--ORG--NAME/snapshots/<40-hex commit>.
_HUB_REPO = re.compile(r"^models--(?:[^/]+--)?(?P<name>[^/]+)$")
_HUB_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MODEL_HASH_DIGITS = 10      # AUTOMATIC1111's short hash: sha256 hex digest[:10]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_model_name(name: str, what: str = "model name") -> str:
    """`name` if it can stand as AUTOMATIC1111's `Model:` value; InvalidInput naming the
    character that would break the PNG parameters text otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{what} must be a non-empty string, got {name!r:.60}")
    bad = next((c for c in name if c in _NAME_BREAKERS or unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        raise InvalidInput(f"{what} {name!r:.80} holds {bad!r}: a model name may not contain commas, colons, "
                           f"quotes or line breaks (the PNG parameters text separates its fields with them)")
    if name != name.strip():
        raise InvalidInput(f"{what} {name!r:.80} starts or ends with spaces, which the PNG parameters text drops")
    return name


def model_name(path: str | os.PathLike[str]) -> str:
    """The checkpoint's name for a checkpoint folder: NAME for a Hugging Face hub cache
    snapshot (.../models--ORG--NAME/snapshots/<commit>), else the folder's own name;
    characters `check_model_name` refuses become "_". "" when nothing is left."""
    path = Path(path)
    name = path.name
    if _HUB_COMMIT.match(path.name) and path.parent.name == "snapshots":
        hub = _HUB_REPO.match(path.parent.parent.name)
        if hub:
            name = hub.group("name")
    cleaned = "".join("_" if c in _NAME_BREAKERS or unicodedata.category(c).startswith("C") else c for c in name)
    return cleaned.strip()


@dataclass(frozen=True)
class CheckpointInfo:
    """The checkpoint an artifact was exported from, as PNG metadata names it."""

    name: str               # AUTOMATIC1111's `Model`: the checkpoint's name, not a cache folder
    sha256: str = ""        # SHA-256 of the U-Net weights (see `weights`); "" = not computed
    # The files hashed, relative to the checkpoint folder, in the order their bytes were
    # hashed (a sharded U-Net: its shards in the order of their numbers).
    weights: tuple[str, ...] = ()

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's `Model hash`: the first 10 hex digits of the weights' SHA-256
        (its `shorthash` of a single-file checkpoint), "" when not computed."""
        return self.sha256[:MODEL_HASH_DIGITS]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model_hash": self.model_hash, "sha256": self.sha256,
                "weights": list(self.weights)}

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> "CheckpointInfo":
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{where}: 'checkpoint' must be an object, got {type(data).__name__}")
        name, sha, weights = data.get("name"), data.get("sha256", ""), data.get("weights", [])
        try:
            check_model_name(name, "checkpoint name")
        except InvalidInput as e:
            raise ArtifactError(f"{where}: {e}") from None
        if not isinstance(sha, str) or (sha and not _SHA256.match(sha)):
            raise ArtifactError(f"{where}: checkpoint sha256 {sha!r:.80} is not 64 lowercase hex digits")
        if data.get("model_hash", sha[:MODEL_HASH_DIGITS]) != sha[:MODEL_HASH_DIGITS]:
            raise ArtifactError(f"{where}: checkpoint model_hash {data.get('model_hash')!r:.40} is not the first "
                                f"{MODEL_HASH_DIGITS} digits of its sha256")
        if not isinstance(weights, list) or not all(isinstance(w, str) for w in weights):
            raise ArtifactError(f"{where}: checkpoint weights must be a list of file names")
        return cls(name, sha, tuple(weights))


@dataclass(frozen=True)
class Manifest:
    facts: ModelFacts
    shape: ShapeConfig
    precisions: Mapping[Stage, Precision]      # one entry per stage of the artifact, in stage order
    files: Mapping[str, FileRecord]            # path relative to the folder -> record
    tools: Mapping[str, str] = field(default_factory=dict)
    verification: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    format_version: int = FORMAT_VERSION       # what the folder was written as (1: sdrt 0.1)
    checkpoint: CheckpointInfo | None = None   # None: exported before sdrt recorded it
    # LoRAs merged into the weights at export (`sdrt export --lora`): name, file, scale, sha256
    merged_loras: tuple[Mapping[str, Any], ...] = ()

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The artifact's own stages, in export order: what every stage loop iterates."""
        return tuple(self.precisions)

    @property
    def family(self) -> Family:
        return family(self.facts.family)

    @property
    def specs(self) -> dict[Stage, StageSpec]:
        return stage_specs(self.facts, self.shape, self.stages)

    def has(self, stage: Stage) -> bool:
        return stage in self.precisions

    @property
    def model_name(self) -> str:
        """The checkpoint's name for PNG metadata: as recorded at export, or for an older
        manifest derived from its source folder the same way; "" when unknown."""
        if self.checkpoint is not None:
            return self.checkpoint.name
        return model_name(self.source) if self.source else ""

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's model hash of the checkpoint ("" for an older manifest)."""
        return self.checkpoint.model_hash if self.checkpoint is not None else ""

    def to_json(self) -> dict[str, Any]:
        specs = self.specs
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": self.source,
            **({"checkpoint": self.checkpoint.to_json()} if self.checkpoint is not None else {}),
            "family": self.facts.family,
            "model": self.facts.to_json(),
            "shape": self.shape.to_json(),
            "stages": [
                {
                    "name": s.value,
                    "file": s.onnx_file,
                    **({"data_file": s.data_file} if s.data_file else {}),
                    "precision": self.precisions[s].value,
                    **specs[s].to_json(),
                }
                for s in self.stages
            ],
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "tools": dict(self.tools),
            "verification": dict(self.verification),
            **({"merged_loras": [dict(m) for m in self.merged_loras]} if self.merged_loras else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        try:
            if data.get("format") != FORMAT:
                raise ArtifactError(f"{where}: not an sdrt manifest (format {data.get('format')!r})")
            version = data.get("format_version")
            if version not in READ_VERSIONS or isinstance(version, bool):
                raise ArtifactError(
                    f"{where}: format version {version!r} is not supported "
                    f"(this sdrt reads {', '.join(map(str, READ_VERSIONS))}); export the model again")
            facts = ModelFacts.from_json(data["model"])
            shape = ShapeConfig.from_json(data["shape"])
            stated = _stated_stages(data, version, where)
            precisions = {s: Precision(entry["precision"]) for s, entry in stated.items()}
            records = {str(k): FileRecord(str(v["sha256"]), int(v["size"])) for k, v in data["files"].items()}
            checkpoint = CheckpointInfo.from_json(data["checkpoint"], where) if "checkpoint" in data else None
            merged = data.get("merged_loras", [])
            if not isinstance(merged, list) or not all(isinstance(m, dict) for m in merged):
                raise ArtifactError(f"{where}: merged_loras must be a list of objects")
            manifest = cls(facts, shape, precisions, records, dict(data.get("tools", {})),
                           dict(data.get("verification", {})), str(data.get("source", "")), version, checkpoint,
                           tuple(merged))
            if version >= 2 and data.get("family") != facts.family:
                raise ArtifactError(f"{where}: family {data.get('family')!r:.40} differs from the model's "
                                    f"{facts.family!r:.40}")
            manifest.family.check_stages(manifest.stages, where)
            if shape.deepcache != (Stage.UNET_SHALLOW in manifest.stages):
                raise ArtifactError(f"{where}: shape deepcache is {shape.deepcache} but the stages "
                                    f"{'lack' if shape.deepcache else 'include'} {Stage.UNET_SHALLOW.value}")
            if (Stage.SAFETY_CHECKER in manifest.stages) != (facts.safety_image_size > 0):
                raise ArtifactError(f"{where}: model fact safety_image_size is {facts.safety_image_size} but the "
                                    f"stages {'include' if facts.safety_image_size == 0 else 'lack'} "
                                    f"{Stage.SAFETY_CHECKER.value}")
            if bool(shape.controlnets) != (Stage.CONTROLNET in manifest.stages):
                raise ArtifactError(f"{where}: shape controlnets is {shape.controlnets} but the stages "
                                    f"{'lack' if shape.controlnets else 'include'} {Stage.CONTROLNET.value}")
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            raise ArtifactError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        # The stated tensor specs must be the ones the facts and shapes imply; a
        # hand-edited shape would otherwise only fail deep inside an engine.
        for stage, spec in manifest.specs.items():
            given = {k: stated[stage].get(k) for k in ("inputs", "outputs")}
            if given != spec.to_json():
                raise ArtifactError(
                    f"{where}: the {stage.value} tensor specs do not match its model and shape "
                    f"settings (stated {given}, expected {spec.to_json()})")
        for stage in manifest.stages:
            for name in (stage.onnx_file, stage.data_file):
                if name and name not in records:
                    raise ArtifactError(f"{where}: no file record for {name}")
        return manifest


def _stated_stages(data: Mapping[str, Any], version: int, where: str) -> dict[Stage, Mapping[str, Any]]:
    """Stage -> its manifest entry, in the artifact's order, for either format."""
    if version == 1:
        return {s: data["stages"][s.value] for s in FORMAT_1_STAGES}
    entries = data["stages"]
    if not isinstance(entries, list):
        raise ArtifactError(f"{where}: 'stages' must be a list")
    stated: dict[Stage, Mapping[str, Any]] = {}
    for entry in entries:
        try:
            stage = Stage(entry["name"])
        except ValueError:
            raise ArtifactError(f"{where}: stage {entry['name']!r:.40} is not supported by this sdrt") from None
        if stage in stated:
            raise ArtifactError(f"{where}: stage {stage.value} is listed twice")
        stated[stage] = entry
    return stated


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
