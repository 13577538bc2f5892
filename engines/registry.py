"""The backends, by name: which exist, which can run here, their typed options, and
how to open an artifact's engines on one (STYLE.md, habit 12).

A backend is one module of this package declaring `NAME`, a one-line `SUMMARY`, its
pip `EXTRA`, a frozen dataclass `Options` (each field's metadata holds its help
text), `unavailable() -> str | None` (why this machine cannot run it), optionally
`unready(folder, manifest, options) -> str | None` (why this artifact cannot run on
it yet), and `open_engines(folder, manifest, options, stages=None)`. Modules are
imported when first asked for; each imports its engine library (TensorRT, OpenVINO)
only when engines open, so listing the backends for `--help` loads neither.

Nobody branches on a backend's name: the pipeline opens engines through
`open_engines`, the CLI makes its flags from `fields` and `owners`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

from .errors import BackendUnavailable, InvalidInput, InvalidType

# name -> module, in the order `--help` lists them.
BACKENDS = {
    "onnxruntime": "sdrt.engines.onnxruntime",
    "openvino": "sdrt.engines.openvino",
    "tensorrt": "sdrt.engines.tensorrt",
}
AUTO = "auto"
# What `auto` tries, fastest first: TensorRT on an NVIDIA GPU where its engines are
# built, OpenVINO on the CPU, ONNX Runtime everywhere.
AUTO_ORDER = ("tensorrt", "openvino", "onnxruntime")
DEFAULT = "onnxruntime"   # the exact path: auto is opt-in


def module(name: str) -> ModuleType:
    return importlib.import_module(BACKENDS[name])


def parse(name: Any) -> str:
    """A backend name, or "auto"; InvalidInput naming the known ones otherwise."""
    if not isinstance(name, str):
        raise InvalidType(f"backend must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key != AUTO and key not in BACKENDS:
        raise InvalidInput(f"unknown backend {name!r}: choose one of {', '.join(names(auto=True))}")
    return key


def names(auto: bool = False) -> list[str]:
    return ([AUTO] if auto else []) + list(BACKENDS)


def fields(name: str) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(module(name).Options)


def owners(option: str) -> list[str]:
    """The backends that take an option."""
    return [b for b in BACKENDS if any(f.name == option for f in fields(b))]


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of an option field: metadata's, else --name, and for a
    switch that is on by default --no-name."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    dashed = f.name.replace("_", "-")
    return f"--no-{dashed}" if f.metadata.get("type") is bool and f.default is True else f"--{dashed}"


def unavailable(name: str) -> str | None:
    """Why this machine cannot run backend `name` (one line), or None."""
    return module(name).unavailable()


def backend_of(options: Any) -> str | None:
    """The backend whose Options record `options` is, or None."""
    for name, mod in BACKENDS.items():
        if type(options).__module__ == mod:
            return name
    return None


def make_options(name: str, values: Mapping[str, Any], flags: bool = False) -> Any:
    """The backend's Options record from keyword values, checked: an option of another
    backend is refused naming the backend(s) that take it, an unknown one listing
    what this backend takes, a bad value by its Options' own check. `flags`: name
    options by their command-line flags in the messages."""
    own = {f.name: f for f in fields(name)}

    def label(option: str) -> str:
        if not flags:
            return f"option {option!r}"
        taken = next((f for b in BACKENDS for f in fields(b) if f.name == option), None)
        return flag(taken) if taken is not None else f"option {option!r}"

    for option in values:
        if option in own:
            continue
        others = owners(option)
        if others:
            raise InvalidInput(f"{label(option)} belongs to the {' and '.join(others)} backend"
                               f"{'s' if len(others) > 1 else ''}, not {name}")
        takes = ", ".join((flag(f) if flags else f.name) for f in own.values()) or "none"
        raise InvalidInput(f"unknown option {option!r} for the {name} backend: it takes {takes}")
    try:
        return module(name).Options(**values)
    except TypeError as e:   # a dataclass refusing a value of the wrong kind
        raise InvalidType(f"{name} options: {e}") from None


def check_options(backend: str, values: Mapping[str, Any], flags: bool = False) -> None:
    """Validate options before any engine loads. For `auto`, each option must belong
    to some backend and its value be valid there (which backend runs is decided later)."""
    if backend != AUTO:
        make_options(backend, values, flags)
        return
    for name in BACKENDS:
        taken = {k: v for k, v in values.items() if owners(k) and name in owners(k)}
        if taken:
            make_options(name, taken, flags)
    unknown = [k for k in values if not owners(k)]
    if unknown:
        known = sorted({f.name for b in BACKENDS for f in fields(b)})
        raise InvalidInput(f"unknown option {unknown[0]!r}: the backends take {', '.join(known)}")


@dataclass(frozen=True)
class Choice:
    """A backend resolved for one artifact: its name, its Options record, and for
    `auto` the one-line reason it was picked."""

    name: str
    options: Any
    reason: str | None = None


def resolve(backend: Any, folder: str | Path, manifest: Any, options: Any = None,
            **values: Any) -> Choice:
    """The backend to open `folder` on, with its checked Options.

    backend: a name, or "auto" (TensorRT where available and built for this artifact,
    else OpenVINO if installed, else ONNX Runtime). options: a backend's Options
    record, or None to build one from `values`. With auto, options that belong to a
    backend other than the one picked are left out, and the reason says so.
    An explicitly named backend that cannot run here raises BackendUnavailable.
    """
    name = parse(backend)
    if options is not None:
        if values:
            raise InvalidInput(f"give either an Options record or option keywords, not both "
                               f"(got {sorted(values)} too)")
        owner = backend_of(options)
        if owner is None:
            raise InvalidType(f"options must be a backend's Options record "
                              f"(sdrt.engines.<backend>.Options), got {type(options).__name__}")
    if name != AUTO:
        if options is not None and owner != name:
            raise InvalidInput(f"options are the {owner} backend's Options, not the {name} backend's")
        record = options if options is not None else make_options(name, values)
        why = unavailable(name)
        if why is not None:
            raise BackendUnavailable(f"the {name} backend cannot run here: {why}")
        return Choice(name, record)
    if options is None:
        check_options(AUTO, values)
    skipped = []
    for candidate in AUTO_ORDER:
        why = unavailable(candidate)
        if why is None:
            mod = module(candidate)
            unready = getattr(mod, "unready", None)
            if unready is not None:
                own = options if options is not None and backend_of(options) == candidate else None
                if own is None:
                    own = make_options(candidate, {k: v for k, v in values.items() if candidate in owners(k)})
                why = unready(folder, manifest, own)
        if why is None:
            break
        skipped.append(f"{candidate}: {why}")
    else:   # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailable(f"no backend can run here ({'; '.join(skipped)})")
    because = f" ({'; '.join(skipped)})" if skipped else ""
    if options is not None and backend_of(options) != candidate:
        raise InvalidInput(f"options are the {backend_of(options)} backend's Options, but auto picked "
                           f"{candidate}{because}")
    kept = {k: v for k, v in values.items() if candidate in owners(k)}
    dropped = sorted(set(values) - set(kept))
    record = options if options is not None else make_options(candidate, kept)
    reason = f"auto picked {candidate}{because}"
    if dropped:
        reason += f"; leaving out {', '.join(dropped)}, not options of {candidate}"
    return Choice(candidate, record, reason)


def open_engines(folder: str | Path, manifest: Any, backend: Any = DEFAULT, options: Any = None,
                 stages: Sequence[Any] | None = None, **values: Any) -> dict:
    """Open an artifact's engines (all stages unless `stages` is given) on `backend`,
    a name or a `Choice` from `resolve`."""
    choice = backend if isinstance(backend, Choice) else resolve(backend, folder, manifest, options, **values)
    mod = module(choice.name)
    try:
        return mod.open_engines(Path(folder), manifest, choice.options, stages=stages)
    except ImportError as e:   # a traceback otherwise: a library present but broken
        raise BackendUnavailable(f"the {choice.name} backend cannot run here ({e})"
                                 + (f"; pip install 'sdrt[{mod.EXTRA}]'" if mod.EXTRA else "")) from None


def describe(name: str) -> str:
    """One line for `--help`: the summary and whether it can run here."""
    mod = module(name)
    why = mod.unavailable()
    return f"{mod.SUMMARY}. " + ("Available here." if why is None else f"Not available here: {why}.")
