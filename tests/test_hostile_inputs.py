"""The catalogue of bad inputs, for every CLI command and every public API call.

CLI: every bad value exits with code 2 and exactly one line on stderr (besides
progress lines) that starts with `sdrt <command>: error:` and names the value; no
traceback; nothing is written anywhere (the test folder and the artifact folder are
compared before and after). API: each bad value raises the documented exception
type, with a message naming the value. A hypothesis property test throws wrong types
and out-of-range values at `Pipeline.__call__`: every call either returns finite
pixels in [0, 1] or raises one of the documented types.

The tables below are the catalogue the README's "accepted inputs" table summarises.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdrt.engines.errors import (AlreadyExists, ArtifactError, BackendUnavailable, InvalidInput, InvalidType,
                                 MissingFile, NumericsError)
from sdrt.cli.main import build_parser, main

LONG = "x" * 100_001   # one past the accepted prompt length
PROGRESS = re.compile(r"\[\s*[\d.]+ ?s\] ")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not PROGRESS.match(line)]


def _commands() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices)


# -- the CLI catalogue -------------------------------------------------------------
# (command line with placeholders, words the one error line must contain).
# {art}: a complete artifact folder; {model}: a checkpoint folder; {file}: a plain
# file; {empty}: an empty folder; {foreign}: a folder holding a user's file;
# {png}: an existing PNG; {new}: a path that does not exist yet (and must not after).

CLI_CASES = [
    # generate
    ("generate {art} --out {new}.png", "required: --prompt"),
    ("generate {art} --prompt LONG --out {new}.png", "prompt is 100001 characters long"),
    ("generate {art} --prompt x --negative-prompt LONG --out {new}.png", "negative_prompt is 100001 characters"),
    ("generate {art} --prompt \udcff --out {new}.png", "prompt is not valid Unicode text: '\\udcff'"),
    ("generate {art} --prompt x --steps 0 --out {new}.png", "steps must be from 1 to 1000, got 0"),
    ("generate {art} --prompt x --steps=-1 --out {new}.png", "got -1"),
    ("generate {art} --prompt x --steps 1000000000 --out {new}.png", "got 1000000000"),
    ("generate {art} --prompt x --steps 2.5 --out {new}.png", "--steps: invalid int value: '2.5'"),
    ("generate {art} --prompt x --steps abc --out {new}.png", "--steps: invalid int value: 'abc'"),
    ("generate {art} --prompt x --steps --out {new}.png", "--steps: expected one argument"),
    ("generate {art} --prompt x --clip-skip 5 --out {new}.png", "clip_skip must be from 0 to 1 for this text encoder"),
    ("generate {art} --prompt x --clip-skip one --out {new}.png", "--clip-skip: invalid int value: 'one'"),
    ("generate {art} --prompt x --original-size 1,2,3 --out {new}.png",
     "--original-size: expected two integers such as 1024,1024; got '1,2,3'"),
    ("generate {art} --prompt x --prompt-2 y --out {new}.png", "apply to SDXL models"),
    ("generate {art} --prompt x --refiner {art} --out {new}.png", "not an SDXL refiner"),
    ("generate {art} --prompt x --refiner {new} --out {new}.png", "does not exist"),
    ("generate {art} --prompt (x:1..2) --out {new}.png", "attention weight '1..2' in prompt"),
    ("generate {art} --prompt x --guidance nan --out {new}.png", "guidance must be a finite number from 0 to 100, got nan"),
    ("generate {art} --prompt x --guidance inf --out {new}.png", "got inf"),
    ("generate {art} --prompt x --guidance=-inf --out {new}.png", "got -inf"),
    ("generate {art} --prompt x --guidance=-1 --out {new}.png", "got -1"),
    ("generate {art} --prompt x --guidance 101 --out {new}.png", "got 101"),
    ("generate {art} --prompt x --guidance 1e999 --out {new}.png", "got inf"),
    ("generate {art} --prompt x --guidance x --out {new}.png", "--guidance: invalid float value: 'x'"),
    ("generate {art} --prompt x --scheduler k_lms --out {new}.png", "unknown scheduler 'k_lms': choose one of"),
    ("generate {art} --prompt x --scheduler= --out {new}.png", "unknown scheduler ''"),
    ("generate {art} --prompt x --seed=-1 --out {new}.png", "seed must be from 0 to 2**64-1"),
    (f"generate {{art}} --prompt x --seed {2**64} --out {{new}}.png", f"got {2**64}"),
    ("generate {art} --prompt x --seed x --out {new}.png", "--seed: invalid int value: 'x'"),
    ("generate {art} --prompt x --seed 1.5 --out {new}.png", "--seed: invalid int value: '1.5'"),
    ("generate {art} --prompt x --out {png}", "already exists; pass --force"),
    ("generate {art} --prompt x --out {new}.jpg", "must end in .png"),
    ("generate {art} --prompt x --out {file}/x.png", "is a file, not a folder"),
    ("generate {new} --prompt x --out {new}.png", "does not exist"),
    ("generate {file} --prompt x --out {new}.png", "is not a folder"),
    ("generate {empty} --prompt x --out {new}.png", "has no manifest.json"),
    ("generate {art} --prompt x --backend foo --out {new}.png", "unknown backend 'foo': choose one of auto, onnxruntime, openvino, tensorrt"),
    ("generate {art} --prompt x --backend tensorrt --out {new}.png", "tensorrt"),
    ("generate {art} --prompt x --provider foo --out {new}.png", "unknown ONNX Runtime provider 'foo'"),
    ("generate {art} --prompt x --provider cuda --out {new}.png", "CUDAExecutionProvider is not available"),
    ("generate {art} --prompt x --threads 0 --out {new}.png", "threads must be a positive integer or None, got 0"),
    ("generate {art} --prompt x --threads=-4 --out {new}.png", "got -4"),
    ("generate {art} --prompt x --threads abc --out {new}.png", "--threads: invalid int value: 'abc'"),
    ("generate {art} --prompt x --threads 99999999999 --out {new}.png", "threads 99999999999 is more than 1024"),
    ("generate {art} --prompt x --height 64 --out {new}.png", "unrecognized arguments: --height 64"),
    # info
    ("info {new}", "does not exist"),
    ("info {file}", "is not a folder"),
    ("info {empty}", "has no manifest.json"),
    ("info", "required: ARTIFACT_DIR"),
    # demo: every setting is checked before any model is written
    ("demo --out {new} --steps 0", "got 0"),
    ("demo --out {new} --guidance nan", "got nan"),
    ("demo --out {new} --seed=-1", "seed must be from 0"),
    ("demo --out {new} --scheduler foo", "unknown scheduler 'foo'"),
    ("demo --out {new} --prompt LONG", "prompt is 100001 characters long"),
    ("demo --out {file}", "is a file; the demo needs a folder"),
    # export: checked before torch loads anything
    ("export {new} --out {new}", "does not exist"),
    ("export {file} --out {new}", "is not a folder"),
    ("export {empty} --out {new}", "model_index.json is missing"),
    ("export {model} --out {new} --height 100", "height 100 is not accepted by this U-Net: use a multiple of"),
    ("export {model} --out {new} --height 0", "height 0 is not accepted"),
    ("export {model} --out {new} --height=-64", "height -64 is not accepted"),
    ("export {model} --out {new} --height 999999", "height 999999 is not accepted"),
    ("export {model} --out {new} --width 100", "width 100 is not accepted"),
    ("export {model} --out {new} --width abc", "--width: invalid int value: 'abc'"),
    ("export {model} --out {new} --width 2.5", "--width: invalid int value: '2.5'"),
    ("export {model} --out {new} --batch 0", "got 0"),
    ("export {model} --out {new} --batch=-1", "got -1"),
    ("export {model} --out {new} --batch 65", "batch must be an integer from 1 to 64, got 65"),
    ("export {model} --out {new} --batch abc", "--batch: invalid int value: 'abc'"),
    ("export {model} --out {new} --max-prompt-chunks 0", "max prompt chunks must be an integer from 1 to 16"),
    ("export {model} --out {new} --max-prompt-chunks 17", "(75 prompt tokens each), got 17"),
    ("export {model} --out {new} --max-prompt-chunks x", "--max-prompt-chunks: invalid int value: 'x'"),
    ("export {model} --out {new} --precision fp8", "--precision: invalid choice: 'fp8'"),
    ("export {model} --out {new} --vae-precision bf16", "--vae-precision: invalid choice: 'bf16'"),
    ("export {model} --out {file}", "exists and is not a folder"),
    ("export {model} --out {art}", "already holds exported artifacts"),
    ("export {model} --out {foreign}", "holds files sdrt did not write (notes.txt)"),
    ("export {model}", "required: --out"),
    # tiny-model
    ("tiny-model {empty}", "already exists; choose another folder or pass --force"),
    ("tiny-model {file}", "already exists"),
    ("tiny-model {foreign} --force", "is not a diffusers checkpoint; refusing to replace it"),
    ("tiny-model {new} --variant sd99", "--variant: invalid choice: 'sd99'"),
    ("tiny-model {new} --seed=-1", "seed must be an integer from 0 to 4294967295, got -1"),
    (f"tiny-model {{new}} --seed {2**64}", f"got {2**64}"),
    ("tiny-model {new} --seed x", "--seed: invalid int value: 'x'"),
    # bench
    ("bench {art} --runs 0", "runs 0 is out of range"),
    ("bench {art} --runs abc", "--runs: invalid int value: 'abc'"),
    ("bench {art} --warmup=-1", "warmup -1 is out of range"),
    ("bench {art} --steps 0", "steps 0 is out of range"),
    ("bench {art} --steps 1000000000", "steps 1000000000 is out of range"),
    ("bench {art} --backend foo", "unknown backend 'foo'"),
    ("bench {new}", "does not exist"),
    ("bench {file}", "is not a folder"),
    ("bench {empty}", "has no manifest.json"),
    ("bench {art} --json {png}", "exists: pass --force"),
    ("bench {art} --json {file}/x.json", "is a file, not a folder"),
    ("bench {art} --prompt LONG --runs 1 --warmup 0 --steps 1", "prompt is 100001 characters long"),
    ("bench {art} --scheduler foo --runs 1 --warmup 0 --steps 1", "unknown scheduler 'foo'"),
    # build (TensorRT engines): only where the command is in this build
    ("build {new}", "does not exist"),
    ("build {file}", "is not a folder"),
    ("build {empty}", "has no manifest.json"),
    ("build {art} --workspace-gb 0", "workspace must be more than 0"),
    ("build {art} --workspace-gb nan", "got nan"),
    ("build {art} --workspace-gb x", "--workspace-gb: invalid float value: 'x'"),
    ("build {art} --opt-level 9", "--opt-level: invalid choice: 9"),
    ("build {art} --stages foo", "--stages: invalid choice: 'foo'"),
    ("build {art} --device=-1", "device must be a GPU index (0, 1, ...), got -1"),
    ("build {art} --device x", "--device: invalid int value: 'x'"),
    # serve (refused before it binds or loads anything)
    ("serve {art} --host 0.0.0.0", "is not a loopback address"),
    ("serve {art} --port 70000", "--port must be 0..65535, got 70000"),
    ("serve {art} --max-queue 0", "--max-queue must be at least 1, got 0"),
    ("serve {art} --deadline 0", "--deadline must be a positive number of seconds"),
    ("serve {art} --api-key short", "--api-key must be at least 8 characters"),
    ("serve {art} --lora-dir {file}", "is not a folder"),
    ("serve {empty}", "has no manifest.json"),
    ("serve {art} {art}", "two artifacts are named"),
    ("serve", "the following arguments are required: ARTIFACT_DIR"),
    # the dispatcher
    ("bogus", "invalid choice: 'bogus'"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, sd15_artifacts, tiny_sd15):
    root = tmp_path_factory.mktemp("hostile")
    (root / "a-file.txt").write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("the user's own file\n")
    (root / "existing.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return {"art": sd15_artifacts, "model": tiny_sd15, "file": root / "a-file.txt", "empty": root / "empty",
            "foreign": root / "foreign", "png": root / "existing.png", "root": root}


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folders with size and mtime; the ORT cache and the hash
    stamps, which a successful load may refresh, are not user-visible results."""
    out = {}
    for folder in folders:
        for p in folder.rglob("*"):
            if ".sdrt-cache" in p.parts or p.name == ".sdrt-verified.json":
                continue
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns if p.is_file() else 0)
    return out


def _argv(template: str, places: dict, new: Path) -> list[str]:
    values = {k: str(v) for k, v in places.items()} | {"new": str(new)}
    return [("x" * 100_001 if a == "LONG" else a.format(**values)) for a in template.split(" ")]


@pytest.mark.parametrize("template,words", CLI_CASES, ids=[c[0].replace(" ", "_")[:60] for c in CLI_CASES])
def test_cli_bad_value_exits_2_with_one_line_naming_it(template, words, places, tmp_path, monkeypatch, capsys):
    command = template.split(" ")[0]
    if command not in _commands() and command != "bogus":
        pytest.skip(f"`sdrt {command}` is not in this build")
    monkeypatch.chdir(tmp_path)   # a default output (image.png) would land here, and be seen
    new = tmp_path / "new-thing"
    argv = _argv(template, places, new)
    before = _snapshot(places["root"], places["art"], tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    prefix = "sdrt: error:" if command == "bogus" else f"sdrt {command}: error:"   # unknown options too
    assert lines[0].startswith(prefix) and words in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(places["root"], places["art"], tmp_path) == before, "a refused command wrote files"
    assert not any(tmp_path.parent.glob(f"{new.name}*"))


# A few as real processes, as a user sees them: exit status and the whole stderr.
SUBPROCESS_CASES = [
    ["generate", "{art}", "--prompt", "x", "--steps", "abc"],
    ["generate", "{art}", "--prompt", b"\xff\xfe", "--out", "{new}.png"],   # not UTF-8 in argv
    ["export", "{model}", "--out", "{new}", "--height", "100"],
    ["tiny-model", "{empty}"],
    ["bench", "{art}", "--runs", "0"],
]


@pytest.mark.parametrize("args", SUBPROCESS_CASES, ids=lambda a: "_".join(x if isinstance(x, str) else "bytes" for x in a))
def test_cli_bad_value_in_a_real_process_has_no_traceback(args, places, tmp_path):
    values = {k: str(v) for k, v in places.items()} | {"new": str(tmp_path / "new-thing")}
    argv = [a.format(**values) if isinstance(a, str) else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "sdrt.cli.main", *argv], capture_output=True, timeout=300,
                          cwd=tmp_path)
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"sdrt {args[0]}: error:") and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


# -- the API catalogue -------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(sd15_artifacts):
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline.load(sd15_artifacts) as p:
        yield p


def _latents(pipe, kind):
    shape = pipe.latent_shape
    return {
        "shape": np.zeros(shape[:-1] + (shape[-1] + 8,), np.float32),
        "rank": np.zeros(shape[1:], np.float32),
        "float64": np.zeros(shape, np.float64),
        "float16": np.zeros(shape, np.float16),
        "int": np.zeros(shape, np.int32),
        "list": np.zeros(shape, np.float32).tolist(),
        "nan": np.full(shape, np.nan, np.float32),
        "inf": np.full(shape, np.inf, np.float32),
        "scalar": np.float32(0.0),
        "object": np.zeros(shape, object),
    }[kind]


# (call arguments besides a valid prompt and steps=1, exception type, words)
CALL_CASES = [
    ({"prompt": None}, InvalidType, "prompt must be a string or a list of strings, got NoneType"),
    ({"prompt": 3}, InvalidType, "got int 3"),
    ({"prompt": b"a fox"}, InvalidType, "got bytes"),
    ({"prompt": ["a", "b"]}, InvalidInput, "prompt has 2 items but this artifact generates 1"),
    ({"prompt": []}, InvalidInput, "prompt has 0 items"),
    ({"prompt": [None]}, InvalidType, "prompt items must be strings, got NoneType"),
    ({"prompt": "\ud800"}, InvalidInput, "not valid Unicode text"),
    ({"prompt": LONG}, InvalidInput, "prompt is 100001 characters long; at most 100000"),
    ({"negative_prompt": 5}, InvalidType, "negative_prompt must be a string, a list of strings, or None"),
    ({"negative_prompt": ["a", "b"]}, InvalidInput, "negative_prompt has 2 items"),
    ({"negative_prompt": LONG}, InvalidInput, "negative_prompt is 100001 characters"),
    ({"steps": 0}, InvalidInput, "steps must be from 1 to 1000, got 0"),
    ({"steps": -1}, InvalidInput, "got -1"),
    ({"steps": 10**9}, InvalidInput, "got 1000000000"),
    ({"steps": 10**5000}, InvalidInput, "an integer of about 5000 digits"),
    ({"steps": 2.5}, InvalidType, "steps must be an integer from 1 to 1000, got float 2.5"),
    ({"steps": "3"}, InvalidType, "got str '3'"),
    ({"steps": True}, InvalidType, "got bool True"),
    ({"steps": float("nan")}, InvalidType, "got float nan"),
    ({"guidance": float("nan")}, InvalidInput, "guidance must be a finite number from 0 to 100, got nan"),
    ({"guidance": float("inf")}, InvalidInput, "got inf"),
    ({"guidance": -0.5}, InvalidInput, "got -0.5"),
    ({"guidance": 100.5}, InvalidInput, "got 100.5"),
    ({"guidance": 10**400}, InvalidInput, "guidance must be a finite number"),
    ({"guidance": "7.5"}, InvalidType, "guidance must be a number from 0 to 100, got str '7.5'"),
    ({"clip_skip": 2}, InvalidInput, "clip_skip must be from 0 to 1 for this text encoder (2 layers), got 2"),
    ({"clip_skip": -1}, InvalidInput, "clip_skip must be from 0 to 1"),
    ({"clip_skip": "1"}, InvalidType, "clip_skip must be an integer (0 = no skip), got str '1'"),
    ({"clip_skip": 1.0}, InvalidType, "got float 1.0"),
    ({"prompt_weighting": None}, InvalidType, "prompt_weighting must be True or False, got NoneType"),
    ({"prompt_2": "y"}, InvalidInput, "apply to SDXL models"),
    ({"original_size": (0, 64)}, InvalidInput, "original_size values must be from 1 to 65536 pixels, got (0, 64)"),
    ({"target_size": "64x64"}, InvalidType, "target_size must be a pair of integers (pixels), got '64x64'"),
    ({"denoising_end": 1.5}, InvalidInput, "denoising_end must be in (0, 1) (the fraction of the noise schedule)"),
    ({"denoising_start": 0.5}, InvalidInput, "denoising_start applies to image-to-image"),
    ({"prompt": "a (fox:1.2.3)"}, InvalidInput, "attention weight '1.2.3' in prompt 'a (fox:1.2.3)' is not a number"),
    ({"guidance": 1 + 2j}, InvalidType, "got complex"),
    ({"guidance": np.float32("nan")}, InvalidInput, "got nan"),
    ({"scheduler": "k_lms"}, InvalidInput, "unknown scheduler 'k_lms': choose one of"),
    ({"scheduler": ""}, InvalidInput, "unknown scheduler ''"),
    ({"scheduler": 3}, InvalidType, "scheduler must be a string"),
    ({"seed": -1}, InvalidInput, "seed must be from 0 to 2**64-1"),
    ({"seed": 2**64}, InvalidInput, f"got {2**64}"),
    ({"seed": 1.5}, InvalidType, "seed must be an integer from 0 to 2**64-1, got float 1.5"),
    ({"seed": "42"}, InvalidType, "got str '42'"),
    ({"seed": True}, InvalidType, "got bool True"),
    ({"latents": "shape"}, InvalidInput, "latents must have shape"),
    ({"latents": "rank"}, InvalidInput, "latents must have shape"),
    ({"latents": "float64"}, InvalidType, "latents must be float32, got float64"),
    ({"latents": "float16"}, InvalidType, "got float16"),
    ({"latents": "int"}, InvalidType, "got int32"),
    ({"latents": "object"}, InvalidType, "got object"),
    ({"latents": "list"}, InvalidType, "latents must be a float32 numpy array"),
    ({"latents": "scalar"}, InvalidType, "latents must be a float32 numpy array"),
    ({"latents": "nan"}, InvalidInput, "latents contain NaN or Inf"),
    ({"latents": "inf"}, InvalidInput, "latents contain NaN or Inf"),
    ({"on_step": 3}, InvalidType, "on_step must be a callable"),
]


def _case_id(kwargs: dict) -> str:
    (key, value), = kwargs.items()
    text = f"<{value.bit_length()}-bit int>" if isinstance(value, int) and value.bit_length() > 64 else repr(value)
    return f"{key}={text[:20]}"


@pytest.mark.parametrize("kwargs,error,words", CALL_CASES, ids=[_case_id(c[0]) for c in CALL_CASES])
def test_api_bad_generation_argument_raises_the_documented_type(pipe, kwargs, error, words):
    args = {"prompt": "a fox", "steps": 1, **kwargs}
    if "latents" in kwargs:
        args["latents"] = _latents(pipe, kwargs["latents"])
    with pytest.raises(error) as e:
        pipe(**args)
    assert type(e.value) is error and words in str(e.value), str(e.value)
    assert len(str(e.value)) < 1000, "messages must stay readable, whatever the value"


def _load_cases(places):
    return [
        (dict(folder=None), InvalidType, "artifact folder must be a path, got NoneType"),
        (dict(folder=3), InvalidType, "got int"),
        (dict(folder=places["root"] / "missing"), MissingFile, "does not exist"),
        (dict(folder=places["file"]), MissingFile, "is not a folder"),
        (dict(folder=places["empty"]), ArtifactError, "has no manifest.json"),
        (dict(folder=places["art"], backend="foo"), InvalidInput, "unknown backend 'foo'"),
        (dict(folder=places["art"], backend=3), InvalidType, "backend must be a string"),
        (dict(folder=places["art"], backend="tensorrt"), BackendUnavailable, "tensorrt"),
        (dict(folder=places["art"], threads=0), InvalidInput, "threads must be a positive integer or None, got 0"),
        (dict(folder=places["art"], threads="2"), InvalidInput, "got '2'"),
        (dict(folder=places["art"], threads=True), InvalidInput, "got True"),
        (dict(folder=places["art"], providers="foo"), InvalidInput, "unknown ONNX Runtime provider 'foo'"),
        (dict(folder=places["art"], providers=[3]), InvalidType, "providers must be strings"),
        (dict(folder=places["art"], providers="cuda"), BackendUnavailable, "CUDAExecutionProvider is not available"),
    ]


LOAD_IDS = ["folder=None", "folder=3", "missing", "file", "empty", "backend=foo", "backend=3", "backend=tensorrt",
            "threads=0", "threads='2'", "threads=True", "providers=foo", "providers=[3]", "providers=cuda"]


@pytest.mark.parametrize("index", range(len(LOAD_IDS)), ids=LOAD_IDS)
def test_api_bad_load_argument_raises_the_documented_type(places, index):
    from sdrt.runtime.pipeline import Pipeline

    kwargs, error, words = _load_cases(places)[index]
    with pytest.raises(error) as e:
        Pipeline.load(**kwargs)
    assert type(e.value) is error and words in str(e.value), str(e.value)


def _export_cases(places, out):
    from sdrt.export.config import ExportConfig

    ok = dict(model_dir=places["model"], out_dir=out)
    return [
        (ExportConfig(**{**ok, "model_dir": None}), InvalidType, "model_dir must be a path, got NoneType"),
        (ExportConfig(**{**ok, "out_dir": 3}), InvalidType, "out_dir must be a path, got int"),
        (ExportConfig(**{**ok, "model_dir": places["root"] / "missing"}), MissingFile, "does not exist"),
        (ExportConfig(**{**ok, "model_dir": places["file"]}), MissingFile, "is not a folder"),
        (ExportConfig(**{**ok, "batch": 0}), InvalidInput, "batch must be an integer >= 1"),
        (ExportConfig(**{**ok, "batch": 65}), InvalidInput, "batch must be an integer from 1 to 64, got 65"),
        (ExportConfig(**{**ok, "batch": 1.5}), InvalidInput, "got 1.5"),
        (ExportConfig(**{**ok, "height": 100}), InvalidInput, "height 100 is not accepted"),
        (ExportConfig(**{**ok, "height": "128"}), InvalidInput, "height must be an integer, got '128'"),
        (ExportConfig(**{**ok, "width": 0}), InvalidInput, "width 0 is not accepted"),
        (ExportConfig(**{**ok, "width": 10**6}), InvalidInput, "width 1000000 is not accepted"),
        (ExportConfig(**{**ok, "precision": "fp8"}), InvalidInput, "precision 'fp8' is not supported: choose one of fp32, fp16"),
        (ExportConfig(**{**ok, "vae_precision": "bf16"}), InvalidInput, "vae_precision 'bf16' is not supported"),
        (ExportConfig(**{**ok, "out_dir": places["file"]}), AlreadyExists, "exists and is not a folder"),
        (ExportConfig(**{**ok, "out_dir": places["foreign"]}), AlreadyExists, "holds files sdrt did not write"),
    ]


EXPORT_IDS = ["model_dir=None", "out_dir=3", "model missing", "model is a file", "batch=0", "batch=65",
              "batch=1.5", "height=100", "height='128'", "width=0", "width=1e6", "precision=fp8",
              "vae_precision=bf16", "out is a file", "out holds a user's file"]


@pytest.mark.parametrize("index", range(len(EXPORT_IDS)), ids=EXPORT_IDS)
def test_api_bad_export_config_raises_the_documented_type(places, tmp_path, index):
    from sdrt.export.exporter import export_artifacts

    config, error, words = _export_cases(places, tmp_path / "out")[index]
    with pytest.raises(error) as e:
        export_artifacts(config)
    assert type(e.value) is error and words in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(variant="sd99"), InvalidInput, "sd99"),
    (dict(seed=-1), InvalidInput, "seed must be an integer from 0 to 4294967295, got -1"),
    (dict(seed=2**64), InvalidInput, f"got {2**64}"),
    (dict(seed="1"), InvalidInput, "got '1'"),
], ids=["variant", "seed=-1", "seed=2**64", "seed='1'"])
def test_api_bad_tiny_model_argument_raises_the_documented_type(tmp_path, kwargs, error, words):
    from sdrt.export.tiny import make_tiny_model

    with pytest.raises(error) as e:
        make_tiny_model(tmp_path / "m", **kwargs)
    assert type(e.value) is error and words in str(e.value), str(e.value)
    assert not (tmp_path / "m").exists()


def test_api_tiny_model_refuses_to_replace_a_folder(places):
    from sdrt.export.tiny import make_tiny_model

    with pytest.raises(AlreadyExists, match="already exists"):
        make_tiny_model(places["empty"])
    with pytest.raises(AlreadyExists, match="not a diffusers checkpoint; refusing"):
        make_tiny_model(places["foreign"], force=True)
    assert (places["foreign"] / "notes.txt").is_file()


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(steps=0), InvalidInput, "steps 0 is out of range"),
    (dict(steps="3"), InvalidType, "steps must be an integer, got '3'"),
    (dict(runs=0), InvalidInput, "runs 0 is out of range: use 1 to 10000"),
    (dict(runs=10**9), InvalidInput, "runs 1000000000 is out of range"),
    (dict(warmup=-1), InvalidInput, "warmup -1 is out of range"),
    (dict(warmup=1.5), InvalidType, "warmup must be an integer, got 1.5"),
], ids=["steps=0", "steps='3'", "runs=0", "runs=1e9", "warmup=-1", "warmup=1.5"])
def test_api_bad_bench_config_raises_the_documented_type(places, kwargs, error, words):
    from sdrt.runtime.bench import BenchConfig, run_bench

    with pytest.raises(error) as e:
        run_bench(BenchConfig(artifact_dir=places["art"], **kwargs))
    assert type(e.value) is error and words in str(e.value), str(e.value)


# -- property: nothing thrown at Pipeline.__call__ escapes the documented types ----

DOCUMENTED = (InvalidInput, InvalidType, NumericsError)

_anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.binary(max_size=5),
                      st.complex_numbers(), st.lists(st.integers(), max_size=2), st.just(object()))
_prompts = st.one_of(st.text(alphabet=st.characters(blacklist_categories=()), max_size=40),
                     st.lists(st.text(max_size=5), max_size=3), _anything)
_steps = st.one_of(st.integers(-3, 3), st.sampled_from([0, 1001, 10**9, -(2**63), 2**64, 10**5000]),
                   st.floats(allow_nan=True), st.just(np.int64(2)), _anything.filter(
                       lambda v: not (isinstance(v, int) and not isinstance(v, bool) and v > 3)))
_guidance = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**400),
                      st.just(np.float32(7.5)), st.just(np.float16(np.inf)), _anything)
_seed = st.one_of(st.integers(-(2**70), 2**70), st.just(np.uint64(2**64 - 1)), _anything)


@st.composite
def _latents_strategy(draw):
    kind = draw(st.sampled_from(["none", "right", "wrong_shape", "wrong_dtype", "junk"]))
    if kind == "none":
        return None
    if kind == "junk":
        return draw(_anything)
    dtype = np.float32 if kind != "wrong_dtype" else draw(st.sampled_from([np.float64, np.float16, np.int8]))
    return ("array", kind, dtype, draw(st.floats(allow_nan=True, allow_infinity=True, width=32)))


def _make_latents(pipe, spec):
    if not (isinstance(spec, tuple) and spec and spec[0] == "array"):
        return spec
    _, kind, dtype, fill = spec
    shape = pipe.latent_shape if kind != "wrong_shape" else pipe.latent_shape[:-1] + (1,)
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape).astype(np.float32)
    a.flat[0] = fill   # one value from hypothesis: NaN, Inf, huge or ordinary
    return a.astype(dtype)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(prompt=_prompts, negative=_prompts, steps=_steps, guidance=_guidance,
       scheduler=st.one_of(st.none(), st.sampled_from(["ddim", "euler_a", "dpmpp_2m", "lcm", "pndm"]), _anything),
       seed=_seed, latents=_latents_strategy())
def test_any_generation_arguments_give_an_image_or_a_documented_error(pipe, prompt, negative, steps, guidance,
                                                                      scheduler, seed, latents):
    try:
        result = pipe(prompt, negative_prompt=negative, steps=steps, guidance=guidance, scheduler=scheduler,
                      seed=seed, latents=_make_latents(pipe, latents))
    except DOCUMENTED as e:
        assert str(e) and len(str(e)) < 1000
        return
    # Accepted: then it is a real image, never NaN or a silently clipped NaN-black one.
    assert result.pixels.shape == (pipe.batch, pipe.height, pipe.width, 3)
    assert np.isfinite(result.pixels).all() and result.pixels.min() >= 0 and result.pixels.max() <= 1
    assert len(result.images) == pipe.batch
    assert isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and 1 <= steps <= 1000 or steps is None
    assert math.isfinite(float(guidance))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.lists(st.one_of(
    st.sampled_from(["--prompt", "--negative-prompt", "--steps", "--guidance", "--scheduler", "--seed", "--backend",
                     "--provider", "--threads", "--force", "--", "1", "0", "-1", "nan", "ddim"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6)),
    max_size=8))
def test_any_generate_command_line_exits_0_or_2_and_writes_only_its_output(places, tmp_path, extra):
    """Fuzzed `sdrt generate` command lines: exit 0 (an image was written to the
    --out given) or 2 with one error line; never an escaping exception."""
    out = tmp_path / "fuzz.png"
    out.unlink(missing_ok=True)
    argv = ["generate", str(places["art"]), *extra, "--out", str(out), "--force"]
    if "--" in extra:   # after "--" every word is positional: our --out would not be read
        argv = ["generate", str(places["art"]), "--out", str(out), "--force", *extra]
    before = _snapshot(places["art"])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        os.chdir(cwd)
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert len(_error_lines(err.getvalue())) == 1, err.getvalue()
    # Exit 0 wrote exactly the --out given; exit 2 wrote nothing (a default image.png would show up here).
    assert {p.name for p in tmp_path.iterdir()} == ({"fuzz.png"} if code == 0 else set())
    assert _snapshot(places["art"]) == before


@pytest.mark.parametrize("argv", [["build", "{art}"], ["generate", "{art}", "--prompt", "x", "--backend", "tensorrt"],
                                  ["bench", "{art}", "--backend", "tensorrt"]], ids=lambda a: "_".join(a[:1] + a[3:]))
def test_tensorrt_where_it_cannot_run_is_one_line_saying_so(argv, places, tmp_path, monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(places["art"])
    assert main([a.format(art=places["art"]) for a in argv]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "TensorRT" in lines[0].replace("tensorrt", "TensorRT"), lines
    assert _snapshot(places["art"]) == before and not list(tmp_path.iterdir())


def _config_edit(component: str, **values):
    def edit(model: Path) -> None:
        path = model / component / "config.json"
        import json
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return edit


@pytest.mark.parametrize("edit,words", [
    (_config_edit("vae", scaling_factor=float("nan")), "vae_scaling_factor must be a positive finite number, got nan"),
    (_config_edit("vae", scaling_factor="x"), "could not convert string to float: 'x'"),
    (_config_edit("unet", sample_size="x"), "invalid literal for int()"),
    (_config_edit("unet", sample_size=0), "unet_sample_size must be a positive integer, got 0"),
    (_config_edit("vae", block_out_channels=[]), "vae_scale_factor must be a positive integer"),
    (_config_edit("text_encoder", max_position_embeddings=0), "text_max_length must be a positive integer, got 0"),
    (lambda m: (m / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000), "unreadable JSON"),
    (lambda m: (m / "scheduler" / "scheduler_config.json").write_text("{"), "unreadable JSON"),
    (lambda m: [(m / "tokenizer" / n).unlink() for n in ("vocab.json", "tokenizer.json")],
     "tokenizer/ has neither tokenizer.json nor vocab.json + merges.txt"),
], ids=["vae scaling nan", "vae scaling str", "sample_size str", "sample_size 0", "no VAE blocks",
        "no text positions", "config nested deep", "scheduler not JSON", "no vocab"])
def test_export_of_a_hostile_checkpoint_is_one_line_before_any_work(edit, words, tiny_sd15, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)
    edit(model)
    capsys.readouterr()
    assert main(["export", str(model), "--out", str(tmp_path / "out")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and words in lines[0] and str(model) in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,words", [
    (dict(workspace_gb=float("nan")), "workspace must be more than 0 and at most 1024 GB, got nan"),
    (dict(workspace_gb=0), "got 0"),
    (dict(workspace_gb="4"), "got '4'"),
    (dict(opt_level=9), "optimization level must be an integer from 0 to 5, got 9"),
    (dict(opt_level=2.5), "got 2.5"),
    (dict(device=-1), "device must be a GPU index (0, 1, ...), got -1"),
    (dict(device=True), "got True"),
], ids=["workspace=nan", "workspace=0", "workspace='4'", "opt_level=9", "opt_level=2.5", "device=-1",
        "device=True"])
def test_api_bad_build_config_raises_invalid_input_before_tensorrt(places, kwargs, words):
    from sdrt.engines.build import BuildConfig, build_engines

    with pytest.raises(InvalidInput) as e:
        build_engines(BuildConfig(artifact_dir=places["art"], **kwargs))
    assert type(e.value) is InvalidInput and words in str(e.value), str(e.value)


def test_api_unknown_build_stage_names_the_accepted_ones():
    from sdrt.engines.build import parse_stages

    with pytest.raises(InvalidInput, match="unknown stage 'unet2': choose from text_encoder, text_encoder_2, unet, unet_shallow, vae_encoder, vae_decoder"):
        parse_stages(["unet", "unet2"])
