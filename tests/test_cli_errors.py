"""What the `sdrt` command says when it does not finish (cli/main.py, cli/errors.py).

The user's mistakes and their machine's (sdrt's own errors, OS errors) are one line
and exit code 2; a bug in sdrt (any other exception) is its traceback, an `internal
error` line and exit code 1, never a message that blames the user's input. Unknown
options are reported by the command they were given to; a diffusers checkpoint
given where an artifact folder belongs says how to export it.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdrt.cli import main as cli_main
from sdrt.cli.main import COMMANDS, main
from sdrt.engines.errors import ArtifactError, InvalidInput, InvalidType, MissingFile


def _raising(error: BaseException):
    def handler(*args, **kwargs):
        raise error
    return handler


@pytest.fixture
def info_raises(monkeypatch):
    """`sdrt info` whose formatting step raises the given exception."""
    import sdrt.cli.info as info

    def set_error(error: BaseException) -> None:
        monkeypatch.setattr(info, "format_info", _raising(error))
    return set_error


# -- user errors: one line, exit 2 --------------------------------------------------

@pytest.mark.parametrize("error,line", [
    (InvalidInput("steps must be from 1 to 1000, got 0"), "steps must be from 1 to 1000, got 0"),
    (InvalidType("prompt must be a string"), "prompt must be a string"),
    (ArtifactError("x is incomplete"), "x is incomplete"),
    (MissingFile("artifact folder x does not exist"), "artifact folder x does not exist"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/art/manifest.json"),
     "/srv/art/manifest.json: Permission denied"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/.sdrt-tmp-k2j3.png"),
     "/data/out: No space left on device; free some space and run the command again"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded; free some space and run the command again"),
], ids=["InvalidInput", "InvalidType", "ArtifactError", "MissingFile", "PermissionError", "EIO", "ENOSPC in a temp file",
        "EDQUOT"])
def test_sdrt_and_os_errors_are_one_line_and_exit_2(sd15_artifacts, info_raises, capsys, error, line):
    info_raises(error)
    assert main(["info", str(sd15_artifacts)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"sdrt info: error: {line}"], err


def test_sdrt_traceback_adds_the_traceback_to_a_user_error(sd15_artifacts, info_raises, capsys, monkeypatch):
    monkeypatch.setenv("SDRT_TRACEBACK", "1")
    info_raises(InvalidInput("bad value"))
    assert main(["info", str(sd15_artifacts)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "sdrt info: error: bad value"


# -- bugs: traceback, internal error, exit 1 ----------------------------------------

@pytest.mark.parametrize("error", [ValueError("could not convert string to float: 'x'"),
                                   TypeError("unsupported operand type(s)"), KeyError("unet"),
                                   AttributeError("'NoneType' object has no attribute 'shape'"),
                                   RuntimeError("boom")], ids=lambda e: type(e).__name__)
def test_a_bare_exception_is_an_internal_error_with_its_traceback_and_exit_1(sd15_artifacts, info_raises, capsys,
                                                                             error):
    info_raises(error)
    assert main(["info", str(sd15_artifacts)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):", lines
    last = lines[-1]
    assert last.startswith(f"sdrt info: internal error: {type(error).__name__}: "), last
    assert "a bug in sdrt" in last and "error:" not in last.replace("internal error:", "")


def test_an_internal_error_in_a_real_process(sd15_artifacts, tmp_path):
    """As a user sees it: exit status 1, the traceback, and the internal-error line last."""
    code = ("import sys; import sdrt.cli.info as info\n"
            "def boom(*a, **k): raise ValueError('a bug')\n"
            "info.format_info = boom\n"
            "from sdrt.cli.main import main\n"
            f"sys.argv = ['sdrt', 'info', {str(sd15_artifacts)!r}]\n"
            "sys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last):" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("sdrt info: internal error: ValueError: a bug")


def test_a_rust_writer_reporting_a_full_disk_is_a_user_error(tmp_path, monkeypatch, capsys):
    """tokenizers and safetensors raise their own types for I/O errors, with the OS
    error only in the message; a full disk met there is still the user's to fix."""
    import sdrt.export.tiny as tiny

    monkeypatch.setattr(tiny, "make_tiny_model", _raising(
        Exception("Error while serializing: I/O error: No space left on device (os error 28)")))
    assert main(["tiny-model", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"sdrt tiny-model: error: {tmp_path / 'm'}: No space left on device; free some space and run the command again"]


def test_a_ctrl_c_a_library_turned_into_its_own_error_is_still_an_interrupt(sd15_artifacts, info_raises, capsys):
    """pybind11 modules raise ImportError("initialization failed") when Ctrl-C lands in
    their import, and diffusers' lazy modules wrap that in a RuntimeError."""
    try:
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise ImportError("initialization failed") from e
        except ImportError as e:
            raise RuntimeError("Failed to import diffusers.pipelines.onnx_utils") from e
    except RuntimeError as e:
        wrapped = e
    info_raises(wrapped)
    assert main(["info", str(sd15_artifacts)]) == 130
    assert capsys.readouterr().err.splitlines() == ["sdrt info: interrupted"]


# -- unknown options name the command ------------------------------------------------

@pytest.mark.parametrize("argv,unknown", [
    (["generate", "{art}", "--prompt", "x", "--bogus"], "--bogus"),
    (["generate", "{art}", "--bogus", "1", "--prompt", "x"], "--bogus 1"),
    (["info", "{art}", "--bogus"], "--bogus"),
    (["demo", "--bogus"], "--bogus"),
    (["tiny-model", "{new}", "--bogus"], "--bogus"),
    (["export", "{new}", "--out", "{new}", "--bogus"], "--bogus"),
    (["build", "{art}", "--bogus"], "--bogus"),
    (["bench", "{art}", "--bogus"], "--bogus"),
], ids=["generate", "generate-with-value", "info", "demo", "tiny-model", "export", "build", "bench"])
def test_an_unknown_option_is_reported_by_its_command(sd15_artifacts, tmp_path, capsys, argv, unknown):
    assert main([w.format(art=sd15_artifacts, new=tmp_path / "new") for w in argv]) == 2
    command = argv[0]
    assert capsys.readouterr().err.splitlines() == [
        f"sdrt {command}: error: unrecognized arguments: {unknown} (see sdrt {command} --help)"]
    assert not (tmp_path / "new").exists()


def test_an_unknown_option_before_any_command_is_the_top_level_parsers(capsys):
    assert main(["--bogus"]) == 2
    assert capsys.readouterr().err.splitlines() == ["sdrt: error: unrecognized arguments: --bogus (see sdrt --help)"]


# -- a diffusers checkpoint where an artifact folder belongs -------------------------

@pytest.mark.parametrize("command", ["generate", "info", "build", "bench"])
def test_a_diffusers_checkpoint_given_for_artifacts_says_export_it_first(tiny_sd15, tmp_path, capsys, command,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "my model"   # a space: the suggested command must still work when pasted
    shutil.copytree(tiny_sd15, model)
    extra = ["--prompt", "x"] if command == "generate" else []
    assert main([command, str(model), *extra]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"sdrt {command}: error: {model} is a diffusers checkpoint, not an sdrt artifact folder: export it first "
        f"with `sdrt export '{model}' --out DIR`"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my model"]


def test_an_artifact_folder_that_also_holds_a_model_index_is_used(sd15_artifacts, tmp_path, capsys):
    """The check is for checkpoints only: a manifest makes the folder an artifact folder."""
    folder = tmp_path / "art"
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
    (folder / "model_index.json").write_text("{}")
    assert main(["info", str(folder)]) == 0


def test_every_command_module_is_registered():
    from sdrt.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)
    for name, module in COMMANDS.items():
        assert Path(sys.modules[module].__file__).parent == Path(cli_main.__file__).parent, name
