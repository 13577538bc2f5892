"""Shared fixtures: the built-in tiny models and their exported artifacts, built once
per test session (export of both variants takes a few seconds on two cores)."""

from __future__ import annotations

from pathlib import Path

import pytest


def _tiny(tmp_path_factory, variant: str) -> Path:
    from sdrt.export.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("models") / f"tiny-{variant}", variant=variant)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sd2")


def _export(model_dir: Path, out_dir: Path, **kw) -> Path:
    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    export_artifacts(ExportConfig(model_dir=model_dir, out_dir=out_dir, **kw))
    return out_dir


@pytest.fixture(scope="session")
def sd15_artifacts(tiny_sd15, tmp_path_factory) -> Path:
    """fp32, native size, batch 1, CFG: the default export of the SD 1.5 tiny model."""
    return _export(tiny_sd15, tmp_path_factory.mktemp("artifacts") / "sd15")


@pytest.fixture(scope="session")
def sd2_artifacts(tiny_sd2, tmp_path_factory) -> Path:
    return _export(tiny_sd2, tmp_path_factory.mktemp("artifacts") / "sd2")


@pytest.fixture(scope="session")
def sd15_batch2_artifacts(tiny_sd15, tmp_path_factory) -> Path:
    """The SD 1.5 tiny model exported with --batch 2 (verify=False: export checks its
    graphs in its own tests; the tests using this compare pixels with diffusers)."""
    return _export(tiny_sd15, tmp_path_factory.mktemp("artifacts") / "sd15-b2", batch=2, verify=False)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The built-in tiny SDXL base (9 s to make on two cores; shared, never written to)."""
    return _tiny(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "sdxl-refiner")


@pytest.fixture(scope="session")
def export_into():
    """Export a model folder with non-default settings: export_into(model, out, batch=2, ...)."""
    return _export
