"""Interrupted work never leaves a folder that loads as valid.

`sdrt export` runs in a child process that is killed with SIGKILL (no clean-up
handlers run) at chosen moments, recognised by the files export leaves behind. After
each kill the folder must be refused by `load_manifest`, by `sdrt info`/`generate`
(exit 2, one line) and by `Pipeline.load`; the next export must say it found
leftovers, redo the work, and leave a folder that loads and holds no temporaries.

The default run's kill of an export is tests/test_export_cli.py's; the slow tests here
kill once when the text encoder's graph is already in place (a complete, valid ONNX
file in a folder that is not complete), then at every moment, each run starting on the
previous run's leftovers.

The TensorRT engine cache's write path is killed the same way, with fake plans.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from sdrt.engines.errors import ArtifactError, MissingFile
from sdrt.engines.files import TEMP_PREFIX
from sdrt.engines.manifest import MANIFEST_NAME, load_manifest
from sdrt.engines.specs import Stage
from sdrt.cli.main import main


@pytest.fixture(autouse=True)
def sigint_not_ignored():
    """The commands these tests start must see Ctrl-C. A test run started in the
    background (a non-interactive shell's `&`, nohup) ignores SIGINT, and its children
    inherit that, as sdrt means them to (cli/main.py leaves an inherited ignore alone);
    so the test process takes the default handler while it starts them."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

LEFTOVERS_MESSAGE = "leftovers of an interrupted export"
CHILD_TIMEOUT_S = 300


def _temp_dirs(out: Path, stage: Stage) -> list[Path]:
    return list(out.glob(f"{TEMP_PREFIX}{stage.value}-*")) if out.is_dir() else []


@dataclass(frozen=True)
class Moment:
    name: str
    reached: Callable[[Path], bool]


# In the order export reaches them.
MOMENTS = (
    Moment("text encoder work folder created", lambda o: bool(_temp_dirs(o, Stage.TEXT_ENCODER))),
    Moment("text encoder being traced", lambda o: any((d / "raw").is_dir() for d in _temp_dirs(o, Stage.TEXT_ENCODER))),
    Moment("text_encoder.onnx in place", lambda o: (o / Stage.TEXT_ENCODER.onnx_file).is_file()),
    Moment("U-Net being traced", lambda o: any((d / "raw").is_dir() for d in _temp_dirs(o, Stage.UNET))),
    Moment("U-Net graph written in its work folder",
           lambda o: any((d / Stage.UNET.onnx_file).is_file() for d in _temp_dirs(o, Stage.UNET))),
    Moment("unet.onnx.data in place", lambda o: (o / Stage.UNET.data_file).is_file()),
    Moment("vae_decoder.onnx in place (all graphs, no runtime files yet)",
           lambda o: (o / Stage.VAE_DECODER.onnx_file).is_file()),
)


def _export_cmd(model: Path, out: Path) -> list[str]:
    # --no-verify: verification does not write files, and skipping it halves the run.
    return [sys.executable, "-m", "sdrt.cli.main", "export", str(model), "--out", str(out), "--no-verify"]


def _run_until(model: Path, out: Path, reached: Callable[[Path], bool] | None, log: Path,
               after_s: float | None = None) -> tuple[bool, str]:
    """Start an export; SIGKILL it when `reached(out)` first holds (or after `after_s`).
    Returns (killed, stderr)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(_export_cmd(model, out), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        start = time.monotonic()
        killed = False
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - start
                if elapsed > CHILD_TIMEOUT_S:
                    raise AssertionError(f"export did not finish in {CHILD_TIMEOUT_S}s")
                if (reached is not None and reached(out)) or (after_s is not None and elapsed >= after_s):
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.01)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return killed, log.read_text(errors="replace")


def _assert_not_loadable(out: Path, capsys) -> None:
    if not out.exists():
        return  # killed before export created the folder: nothing to mistake for a result
    assert not (out / MANIFEST_NAME).exists(), "a killed export left a manifest"
    with pytest.raises((ArtifactError, MissingFile)):
        load_manifest(out)
    capsys.readouterr()
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "incomplete" in err and "Traceback" not in err
    try:
        from sdrt.runtime.pipeline import Pipeline
    except ImportError:  # the runtime is not in this build
        return
    with pytest.raises(ArtifactError, match="incomplete"):
        Pipeline.load(out)


def _assert_valid_and_clean(out: Path) -> None:
    manifest = load_manifest(out)
    assert set(manifest.files) >= {s.onnx_file for s in manifest.stages}
    assert not list(out.rglob(TEMP_PREFIX + "*")), "temporary files left behind by a completed export"


def _rerun_detects_leftovers(model: Path, out: Path, tmp_path: Path) -> None:
    had_leftovers = out.is_dir() and any(out.iterdir())
    killed, err = _run_until(model, out, None, tmp_path / "final.log")
    assert not killed
    assert "Traceback" not in err, err
    if had_leftovers:
        assert LEFTOVERS_MESSAGE in err, err
    _assert_valid_and_clean(out)


@pytest.mark.slow   # 31 s: two exports; the default run kills an export in test_export_cli.py
def test_export_killed_with_a_graph_in_place_is_not_valid_and_is_redone(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "artifacts"
    moment = next(m for m in MOMENTS if m.name == "text_encoder.onnx in place")
    killed, err = _run_until(tiny_sd15, out, moment.reached, tmp_path / "kill.log")
    assert killed, f"export finished before {moment.name!r}:\n{err}"
    assert (out / Stage.TEXT_ENCODER.onnx_file).is_file()
    _assert_not_loadable(out, capsys)
    _rerun_detects_leftovers(tiny_sd15, out, tmp_path)


@pytest.mark.slow
def test_export_killed_at_every_moment_never_leaves_a_valid_folder(tiny_sd15, tmp_path, capsys):
    """Each run starts on the previous run's leftovers, so this also checks that
    export recovers from every partial state, not just from an empty folder."""
    out = tmp_path / "artifacts"
    report = []
    for i, moment in enumerate(MOMENTS):
        started = time.monotonic()
        killed, err = _run_until(tiny_sd15, out, moment.reached, tmp_path / f"kill-{i}.log")
        last_moment_s = time.monotonic() - started   # the last one is close to the whole export
        assert killed, f"export finished before {moment.name!r}:\n{err}"
        if i > 0:
            assert LEFTOVERS_MESSAGE in err, err
        _assert_not_loadable(out, capsys)
        report.append(moment.name)
    # Timed kills at random moments (fixed seed, so a failure can be replayed).
    rng = random.Random(5)
    for j, after in enumerate(sorted(rng.uniform(0.15, 0.8) * last_moment_s for _ in range(4))):
        killed, _ = _run_until(tiny_sd15, out, None, tmp_path / f"timed-{j}.log", after_s=after)
        if killed:
            _assert_not_loadable(out, capsys)
        else:
            _assert_valid_and_clean(out)   # it finished first: then it must be complete
            shutil.rmtree(out)
        report.append(f"after {after:.1f}s" + ("" if killed else " (export had finished)"))
    _rerun_detects_leftovers(tiny_sd15, out, tmp_path)
    print("kill moments:", "; ".join(report))


@pytest.mark.slow   # 10 s; the default run checks the same with a crash (test_export_cli.py)
def test_forced_reexport_killed_early_does_not_leave_the_old_manifest(tiny_sd15, sd15_artifacts, tmp_path, capsys):
    """--force over a complete folder removes the manifest first, so a re-export
    killed half-way does not leave the old manifest vouching for new, partial files."""
    out = tmp_path / "artifacts"
    shutil.copytree(sd15_artifacts, out)
    cmd = _export_cmd(tiny_sd15, out) + ["--force"]
    with open(tmp_path / "force.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT_S
            while (out / MANIFEST_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    _assert_not_loadable(out, capsys)


# -- the TensorRT engine cache -----------------------------------------------------
# TensorRT cannot run here, so the child writes fake plans through the cache's own
# write path (engines/cache.py store_plan), in a loop over keys whose plans have the
# same size and different bytes: the size check alone cannot tell them apart, so
# only the write order (sidecar removed first, written last) keeps the cache honest.

_PLAN_WRITER = """
import sys
from sdrt.engines import cache
from sdrt.engines.specs import Precision, Stage
folder, size = sys.argv[1], int(sys.argv[2])
platform = cache.Platform("10.3.0", "Fake GPU", "8.7")
info = cache.BuildInfo(workspace_bytes=0, opt_level=3, seconds=0.0)
print("ready", flush=True)
i = 0
while True:
    key = cache.EngineKey(Stage.UNET, Precision.FP16, f"{i % 4:064x}", platform)
    cache.store_plan(folder, key, bytes([i % 4]) * size, info)
    i += 1
"""


def _cache_keys():
    from sdrt.engines import cache
    from sdrt.engines.specs import Precision

    platform = cache.Platform("10.3.0", "Fake GPU", "8.7")
    return [cache.EngineKey(Stage.UNET, Precision.FP16, f"{i:064x}", platform) for i in range(4)]


@pytest.mark.parametrize("kill_after_s", [0.05, 0.2, 0.45, 0.7, 1.3])
def test_engine_cache_killed_mid_write_never_vouches_for_other_bytes(tmp_path, kill_after_s):
    from sdrt.engines import cache

    size = 8 << 20
    proc = subprocess.Popen([sys.executable, "-c", _PLAN_WRITER, str(tmp_path), str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        time.sleep(kill_after_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    current = []
    for i, key in enumerate(_cache_keys()):
        fast = cache.check(tmp_path, key, verify_hash=False)   # the check load_plan makes
        if fast.current:
            assert cache.load_plan(tmp_path, key) == bytes([i]) * size
            current.append(i)
        else:
            assert fast.status in (cache.Status.MISSING, cache.Status.DAMAGED, cache.Status.STALE)
            with pytest.raises(ArtifactError, match="sdrt build"):
                cache.load_plan(tmp_path, key)
    assert len(current) <= 1, "one stage can have only one current engine"
    # The next build of any key succeeds over the leftovers and is current.
    key = _cache_keys()[2]
    cache.store_plan(tmp_path, key, bytes([2]) * size, cache.BuildInfo(0, 3, 0.0))
    assert cache.check(tmp_path, key).current and cache.load_plan(tmp_path, key) == bytes([2]) * size


# -- the ONNX Runtime optimized-graph cache ---------------------------------------

def test_generate_killed_while_writing_the_ort_cache_leaves_a_folder_that_loads_and_matches(
        sd15_artifacts, tmp_path):
    """`sdrt generate` writes ORT's optimized graphs under .sdrt-cache/ on first load;
    killed while doing so, the next load must give exactly the uncached result."""
    import numpy as np

    from sdrt.engines.onnxruntime import CACHE_DIR, CACHE_TEMP_PREFIX
    from sdrt.runtime.pipeline import Pipeline

    folder = tmp_path / "artifacts"
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
    cache = folder / CACHE_DIR

    def writing(_: Path) -> bool:
        return cache.is_dir() and any(p.name.startswith(CACHE_TEMP_PREFIX) for p in cache.iterdir())

    cmd = [sys.executable, "-m", "sdrt.cli.main", "generate", str(folder), "--prompt", "a fox", "--steps", "2",
           "--seed", "3", "--out", str(tmp_path / "x.png")]
    with open(tmp_path / "gen.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT_S
            while proc.poll() is None and not writing(folder) and time.monotonic() < deadline:
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL, "generate finished before its cache write could be interrupted"
    assert not (tmp_path / "x.png").exists()
    with Pipeline.load(folder, cache=False) as plain:
        want = plain("a fox", steps=2, seed=3).pixels
    for _ in range(2):   # the first load repairs or rebuilds the cache, the second reads it
        with Pipeline.load(folder) as cached:
            assert np.array_equal(cached("a fox", steps=2, seed=3).pixels, want)


def test_build_after_a_killed_build_says_so_and_rebuilds(sd15_artifacts, tmp_path, monkeypatch):
    """`sdrt build` over the leftovers of a killed build (a half-written temporary plan
    and a plan whose record was never written) says what it found and rebuilds; the
    engines are then current. TensorRT and CUDA are faked: only the cache path runs."""
    import io

    from sdrt.engines import cache, cuda, tensorrt
    from sdrt.engines.files import TEMP_PREFIX
    from sdrt.engines import build
    from sdrt.engines.progress import Progress

    folder = tmp_path / "artifacts"
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
    platform = cache.Platform("10.3.0", "Fake GPU", "8.7")
    monkeypatch.setattr(tensorrt, "import_tensorrt", lambda: object())
    monkeypatch.setattr(tensorrt, "current_platform", lambda trt, device: platform)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(build, "build_plan", lambda trt, onnx_path, config: f"plan of {onnx_path.name}".encode())
    engines = cache.engine_dir(folder)
    engines.mkdir()
    (engines / f"{TEMP_PREFIX}half.plan").write_bytes(b"half a plan")               # killed mid-write
    cache.plan_path(folder, Stage.UNET).write_bytes(b"plan with no record")          # killed before the sidecar

    out = io.StringIO()
    report = build.build_engines(build.BuildConfig(artifact_dir=folder, verify=False), Progress(stream=out))
    said = out.getvalue()
    assert "temporary file(s) left by an interrupted build" in said, said
    assert "unet: engine file without its record (left by an interrupted build): rebuilding" in said, said
    manifest = load_manifest(folder)
    assert report.built == list(manifest.stages)
    for stage in manifest.stages:
        key = cache.expected_key(manifest, stage, platform)
        assert cache.check(folder, key).current
        assert cache.load_plan(folder, key) == f"plan of {stage.onnx_file}".encode()
    assert not list(engines.glob(TEMP_PREFIX + "*"))


def test_ctrl_c_during_generate_exits_130_and_writes_no_image(sd15_artifacts, tmp_path):
    """SIGINT in the middle of denoising: exit 130 with one line, no PNG and no
    temporary file left beside it."""
    out = tmp_path / "image.png"
    cmd = [sys.executable, "-m", "sdrt.cli.main", "generate", str(sd15_artifacts), "--prompt", "a fox",
           "--steps", "999", "--seed", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stderr:   # progress lines: interrupt once the steps are running
            lines.append(line)
            if re.search(r"(step|call) \d+/\d+", line):
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.stderr.readlines()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    errors = [ln for ln in lines if not re.match(r"\[\s*[\d.]+ ?s\] ", ln)]
    assert proc.returncode == 130, "".join(lines)
    assert errors == ["sdrt generate: interrupted\n"], "".join(lines)
    assert not list(tmp_path.iterdir())


# -- Ctrl-C at any moment, start-up included ---------------------------------------
# The child says "ready" once sdrt.cli.main is imported (the interpreter's own start,
# site and .pth files, comes before any sdrt code and is not sdrt's to handle), then
# runs the command; SIGINT follows after a delay that lands while the parser's
# modules, onnxruntime or torch are imported, engines are loaded or work is running.

_READY_THEN_MAIN = ("import sys\n"
                    "import sdrt.cli.main as cli\n"
                    "print('ready', flush=True)\n"
                    "sys.exit(cli.main())\n")
_PROGRESS = re.compile(r"\[\s*[\d.]+ ?s\] ")


def _interrupt(argv: list[str], delay_s: float, module: bool = False) -> tuple[int, list[str], str]:
    """Run `sdrt argv`, send SIGINT `delay_s` after it is ready (or after it started, with
    `module`: `python -m sdrt.cli.main`); return its exit status, error lines and stderr."""
    cmd = ([sys.executable, "-m", "sdrt.cli.main", *argv] if module else
           [sys.executable, "-c", _READY_THEN_MAIN, *argv])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if not module:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay_s)
        assert proc.poll() is None, f"the command finished within {delay_s}s: {proc.stderr.read()}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, [ln for ln in err.splitlines() if not _PROGRESS.match(ln)], err


def _exited_130(code: int) -> bool:
    # 130 from sdrt itself; or killed by SIGINT, which a shell also reports as 130:
    # CPython ends a process that way after the command has printed its line and
    # returned when the interrupt passed through a PyRun_* call inside a library
    # (torch's and pybind11's import-time code).
    return code in (130, -signal.SIGINT)


@pytest.mark.parametrize("delay_s", [0.02, 0.1, 0.2, 0.35, 0.6, 1.0])
def test_ctrl_c_while_generate_starts_is_one_line_and_writes_nothing(sd15_artifacts, tmp_path, delay_s):
    from sdrt.engines.onnxruntime import CACHE_DIR, CACHE_TEMP_PREFIX
    from sdrt.runtime.pipeline import Pipeline

    folder = tmp_path / "artifacts"
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))   # load writes the cache
    out = tmp_path / "out"
    code, lines, err = _interrupt(["generate", str(folder), "--prompt", "a fox", "--steps", "999",
                                   "--out", str(out / "fox.png")], delay_s)
    assert _exited_130(code) and lines == ["sdrt generate: interrupted"], err
    assert not out.exists()
    assert not list(folder.rglob(CACHE_TEMP_PREFIX + "*")) and not list(folder.rglob(TEMP_PREFIX + "*"))
    if (folder / CACHE_DIR).is_dir():   # the next load uses or repairs what the interrupted one cached
        with Pipeline.load(folder) as pipe:
            pipe("a fox", steps=1, seed=1)


@pytest.mark.parametrize("delay_s", [0.02, 0.15, 0.4, 0.8, 1.5, 2.5])
def test_ctrl_c_while_export_starts_is_one_line_and_leaves_no_valid_folder(tiny_sd15, tmp_path, delay_s):
    out = tmp_path / "artifacts"
    code, lines, err = _interrupt(["export", str(tiny_sd15), "--out", str(out)], delay_s)
    assert _exited_130(code) and lines == ["sdrt export: interrupted"], err
    assert not (out / MANIFEST_NAME).exists()
    assert not list(tmp_path.rglob(TEMP_PREFIX + "*"))


def test_ctrl_c_as_the_installed_command_starts(tmp_path):
    """`python -m sdrt.cli.main`, as the console script runs main, interrupted while
    torch is being imported for `sdrt tiny-model`."""
    code, lines, err = _interrupt(["tiny-model", str(tmp_path / "m")], 0.3, module=True)
    assert _exited_130(code) and lines == ["sdrt tiny-model: interrupted"], err
    assert list(tmp_path.iterdir()) == []
