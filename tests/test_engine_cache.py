"""The TensorRT engine cache (engines/cache.py), with fake plans and fake platforms:
what invalidates an engine, what is reused, and that a half-written engine never loads."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from sdrt.engines import cache
from sdrt.engines.errors import ArtifactError
from sdrt.engines.manifest import FileRecord
from sdrt.engines.specs import Precision, Stage

ORIN = cache.Platform(tensorrt="10.3.0.30", gpu="Orin", compute_capability="8.7")
H100 = cache.Platform(tensorrt="11.4.0.12", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
PLAN = b"\x00fake-plan\xff" * 1000
INFO = cache.BuildInfo(workspace_bytes=1 << 30, opt_level=3, seconds=1.0)


def fake_manifest(onnx_sha="a" * 64, data_sha="b" * 64, precision=Precision.FP16):
    files = {s.onnx_file: FileRecord(onnx_sha, 10) for s in Stage}
    files[Stage.UNET.data_file] = FileRecord(data_sha, 20)
    return SimpleNamespace(files=files, precisions={s: precision for s in Stage})


def unet_key(platform=H100, **manifest_kw):
    return cache.expected_key(fake_manifest(**manifest_kw), Stage.UNET, platform)


def test_key_changes_with_each_component_and_check_names_it(tmp_path):
    base = unet_key()
    cache.store_plan(tmp_path, base, PLAN, INFO)
    variants = {
        "graph": (unet_key(onnx_sha="c" * 64), "ONNX graph changed"),
        "external data": (unet_key(data_sha="d" * 64), "ONNX graph changed"),
        "precision": (unet_key(precision=Precision.FP32), "engine is fp16, the exported graph is fp32"),
        "tensorrt": (unet_key(platform=dataclasses.replace(H100, tensorrt="11.5.0.1")), "TensorRT 11.5.0.1"),
        "gpu": (unet_key(platform=dataclasses.replace(H100, gpu="NVIDIA H200")), "NVIDIA H200"),
        "sm": (unet_key(platform=dataclasses.replace(H100, compute_capability="10.0")), "sm_100"),
    }
    for what, (key, words) in variants.items():
        assert key.digest != base.digest, what
        result = cache.check(tmp_path, key)
        assert result.status is cache.Status.STALE, what
        assert words in result.reason, (what, result.reason)
    # Another stage's key is not confused with the U-Net's plan.
    assert cache.check(tmp_path, cache.expected_key(fake_manifest(), Stage.VAE_DECODER, H100)).status \
        is cache.Status.MISSING


def test_current_engine_is_reused_byte_for_byte(tmp_path):
    key = unet_key()
    path = cache.store_plan(tmp_path, key, PLAN, INFO)
    assert path == tmp_path / "engines" / "unet.plan"
    assert cache.check(tmp_path, key).current
    assert cache.load_plan(tmp_path, key) == PLAN
    meta = json.loads(cache.sidecar_path(tmp_path, Stage.UNET).read_text())
    assert meta["build"]["opt_level"] == 3 and meta["plan_size"] == len(PLAN)


def test_engine_for_other_gpu_and_tensorrt_is_explained_and_refused(tmp_path):
    cache.store_plan(tmp_path, unet_key(platform=ORIN), PLAN, INFO)
    with pytest.raises(ArtifactError) as e:
        cache.load_plan(tmp_path, unet_key(platform=H100))
    msg = str(e.value)
    assert "engine built for TensorRT 10.3.0.30 / sm_87 Orin" in msg
    assert "this is TensorRT 11.4.0.12 / sm_90 NVIDIA H100 80GB HBM3" in msg
    assert f"sdrt build {tmp_path}" in msg


def test_truncated_plan_is_rejected(tmp_path):
    key = unet_key()
    cache.store_plan(tmp_path, key, PLAN, INFO)
    path = cache.plan_path(tmp_path, Stage.UNET)
    path.write_bytes(PLAN[: len(PLAN) // 2])
    result = cache.check(tmp_path, key)
    assert result.status is cache.Status.DAMAGED and "interrupted build" in result.reason
    with pytest.raises(ArtifactError):
        cache.load_plan(tmp_path, key)


def test_same_size_corrupted_plan_is_rejected_by_hash(tmp_path):
    key = unet_key()
    cache.store_plan(tmp_path, key, PLAN, INFO)
    path = cache.plan_path(tmp_path, Stage.UNET)
    data = bytearray(PLAN)
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.check(tmp_path, key).status is cache.Status.DAMAGED
    with pytest.raises(ArtifactError, match="does not match its record"):
        cache.load_plan(tmp_path, key)


def test_build_killed_before_sidecar_leaves_no_valid_engine(tmp_path, monkeypatch):
    old_key, new_key = unet_key(platform=ORIN), unet_key()
    cache.store_plan(tmp_path, old_key, PLAN, INFO)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the plan, before the sidecar
    monkeypatch.setattr(cache.files, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.store_plan(tmp_path, new_key, PLAN + b"new", INFO)
    monkeypatch.undo()
    # The new plan is on disk under its final name, but nothing vouches for it, and
    # the old record was removed first, so the old key does not match the new bytes.
    assert cache.plan_path(tmp_path, Stage.UNET).read_bytes() == PLAN + b"new"
    for key in (old_key, new_key):
        assert cache.check(tmp_path, key).status is cache.Status.MISSING


def test_unreadable_sidecar_is_damaged_not_an_exception(tmp_path):
    key = unet_key()
    cache.store_plan(tmp_path, key, PLAN, INFO)
    sidecar = cache.sidecar_path(tmp_path, Stage.UNET)
    for text in ("{not json", json.dumps({"format": "other"}), json.dumps([1, 2])):
        sidecar.write_text(text)
        assert cache.check(tmp_path, key).status is cache.Status.DAMAGED


def test_no_temporary_files_left_after_store(tmp_path):
    cache.store_plan(tmp_path, unet_key(), PLAN, INFO)
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["unet.plan", "unet.plan.json"]


def test_timing_cache_round_trip_and_missing_file(tmp_path):
    path = tmp_path / "engines" / cache.TIMING_CACHE_NAME
    assert cache.read_timing_cache(path) == b""
    cache.write_timing_cache(path, b"\x01\x02timing")
    assert cache.read_timing_cache(path) == b"\x01\x02timing"


def test_manifest_without_data_record_is_an_artifact_error():
    manifest = fake_manifest()
    del manifest.files[Stage.UNET.data_file]
    with pytest.raises(ArtifactError, match="unet.onnx.data"):
        cache.onnx_digest(manifest, Stage.UNET)
