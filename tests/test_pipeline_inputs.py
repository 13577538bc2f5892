"""Bad input to the Python API: a typed error (ValueError / TypeError / FileNotFoundError
kinds) whose message names the bad value and what is accepted."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sdrt.engines.errors import ArtifactError, InvalidInput, InvalidType, MissingFile
from sdrt.runtime import Pipeline
from sdrt.runtime.schedulers import SAMPLERS


@pytest.fixture(scope="module")
def pipe(sd15_artifacts):
    return Pipeline.load(sd15_artifacts)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"scheduler": "k_lms"}, InvalidInput, "unknown scheduler 'k_lms': choose one of " + ", ".join(SAMPLERS)),
    ({"scheduler": 3}, InvalidType, "scheduler must be a string"),
    ({"steps": 0}, InvalidInput, "steps must be from 1 to 1000, got 0"),
    ({"steps": 10**6}, InvalidInput, "steps must be from 1 to 1000, got 1000000"),
    ({"steps": 2.5}, InvalidType, "steps must be an integer from 1 to 1000, got float 2.5"),
    ({"steps": True}, InvalidType, "steps must be an integer"),
    ({"guidance": float("nan")}, InvalidInput, "guidance must be a finite number from 0 to 100, got nan"),
    ({"guidance": float("inf")}, InvalidInput, "guidance must be a finite number .* got inf"),
    ({"guidance": -1}, InvalidInput, "guidance must be a finite number from 0 to 100, got -1"),
    ({"guidance": "7.5"}, InvalidType, "guidance must be a number from 0 to 100, got str '7.5'"),
    ({"seed": -1}, InvalidInput, r"seed must be from 0 to 2\*\*64-1 .* got -1"),
    ({"seed": 2**64}, InvalidInput, f"got {2**64}"),
    ({"seed": 1.5}, InvalidType, "seed must be an integer .* got float 1.5"),
    ({"seed": "42"}, InvalidType, "seed must be an integer .* got str '42'"),
    ({"prompt": None}, InvalidType, "prompt must be a string or a list of strings, got NoneType"),
    ({"prompt": 42}, InvalidType, "prompt must be a string or a list of strings, got int 42"),
    ({"prompt": [b"bytes"]}, InvalidType, "prompt items must be strings, got bytes"),
    ({"prompt": ["a", "b"]}, InvalidInput, "prompt has 2 items but this artifact generates 1 image"),
    ({"negative_prompt": 5}, InvalidType, "negative_prompt must be a string, a list of strings, or None"),
])
def test_bad_generation_settings_are_typed_errors_naming_the_value(pipe, kwargs, error, words):
    args = {"prompt": "a fox", "steps": 2, **kwargs}
    with pytest.raises(error, match=words):
        pipe(**args)


def test_errors_are_the_builtin_kinds_callers_catch(pipe):
    with pytest.raises(ValueError):
        pipe("a fox", steps=0)
    with pytest.raises(TypeError):
        pipe(None)


@pytest.mark.parametrize("make, error, words", [
    (lambda shape: np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32), InvalidInput, "latents must have shape"),
    (lambda shape: np.zeros(shape, np.float64), InvalidType, "latents must be float32, got float64"),
    (lambda shape: np.zeros(shape, np.float32).tolist(), InvalidType, "latents must be a float32 numpy array"),
    (lambda shape: np.full(shape, np.nan, np.float32), InvalidInput, "latents contain NaN or Inf"),
])
def test_bad_latents_are_refused_with_the_expected_shape(pipe, make, error, words):
    with pytest.raises(error, match=words):
        pipe("a fox", steps=2, latents=make(pipe.latent_shape))


def test_missing_artifact_folder_is_missing_file(tmp_path):
    with pytest.raises(MissingFile, match="nowhere does not exist"):
        Pipeline.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        Pipeline.load(tmp_path / "nowhere")


def test_folder_without_manifest_is_incomplete(tmp_path):
    (tmp_path / "unet.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match="is incomplete: it has no manifest.json"):
        Pipeline.load(tmp_path)


def test_file_that_does_not_match_the_manifest_hash_is_named(sd15_artifacts, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sd15_artifacts, copy)
    target = copy / "vae_decoder.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF   # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="vae_decoder.onnx: content hash does not match manifest.json"):
        Pipeline.load(copy)


def test_unknown_backend_lists_the_known_ones(sd15_artifacts):
    with pytest.raises(InvalidInput, match="unknown backend 'coreml': choose one of auto, onnxruntime, openvino, tensorrt"):
        Pipeline.load(sd15_artifacts, backend="coreml")
