"""`sdrt export` / `sdrt tiny-model` at the edge: bad input is one line and exit 2,
nothing of the user's is overwritten, and an interrupted export is never taken for
a complete one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from sdrt.engines.errors import ArtifactError
from sdrt.engines.manifest import load_manifest
from sdrt.cli.main import main


def _fails(capsys, argv, *fragments):
    """The command exits 2 with one error line on stderr naming every fragment (after
    any progress lines the command printed before it failed)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert err.startswith(f"sdrt {argv[0]}: error: "), lines
    assert not any("Traceback" in line or "error:" in line for line in lines[:-1]), lines
    for f in fragments:
        assert f in err, (f, err)
    return err


def test_missing_model_folder_is_named(capsys, tmp_path):
    _fails(capsys, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope", "does not exist")


def test_folder_that_is_not_a_checkpoint_names_the_missing_file(capsys, tiny_sd15, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15, broken)
    (broken / "unet" / "config.json").unlink()
    _fails(capsys, ["export", str(broken), "--out", str(tmp_path / "o")], "unet/config.json")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["export", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "model_index.json")


@pytest.mark.parametrize("flag,value", [("--height", "100"), ("--width", "32"), ("--height", "-64")])
def test_size_not_accepted_by_the_unet_names_the_multiple(capsys, tiny_sd15, tmp_path, flag, value):
    _fails(capsys, ["export", str(tiny_sd15), "--out", str(tmp_path / "o"), flag, value], value, "multiple of 64")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_below_one_is_refused(capsys, tiny_sd15, tmp_path, value):
    _fails(capsys, ["export", str(tiny_sd15), "--out", str(tmp_path / "o"), "--batch", value], value, ">= 1")


def test_non_integer_batch_is_a_usage_error(capsys, tiny_sd15, tmp_path):
    _fails(capsys, ["export", str(tiny_sd15), "--out", str(tmp_path / "o"), "--batch", "two"], "two")


def test_existing_artifacts_are_not_overwritten_without_force(capsys, tiny_sd15, sd15_artifacts):
    before = (sd15_artifacts / "manifest.json").read_bytes()
    _fails(capsys, ["export", str(tiny_sd15), "--out", str(sd15_artifacts)], str(sd15_artifacts), "--force")
    assert (sd15_artifacts / "manifest.json").read_bytes() == before


def test_folder_with_unrelated_files_is_refused_without_force(capsys, tiny_sd15, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    _fails(capsys, ["export", str(tiny_sd15), "--out", str(out)], "holiday.jpg", "--force")
    assert (out / "holiday.jpg").read_bytes() == b"precious"


def test_exporting_into_the_model_folder_is_refused_even_with_force(capsys, tiny_sd15):
    before = sorted(p.name for p in tiny_sd15.rglob("*"))
    _fails(capsys, ["export", str(tiny_sd15), "--out", str(tiny_sd15), "--force"], "model folder itself")
    assert sorted(p.name for p in tiny_sd15.rglob("*")) == before


def test_pickle_only_checkpoint_is_refused_unless_allowed(capsys, tiny_sd15, tmp_path):
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_sd15, ckpt)
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), ckpt / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    _fails(capsys, ["export", str(ckpt), "--out", str(tmp_path / "o")], "unet/diffusion_pytorch_model.bin",
           "execute code", "--allow-pickle-code-execution")
    assert not (tmp_path / "o").exists()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "o"), "--no-verify",
                 "--allow-pickle-code-execution"]) == 0
    load_manifest(tmp_path / "o")


def test_verification_over_tolerance_fails_and_writes_no_manifest(capsys, tiny_sd2, tmp_path, monkeypatch):
    import sdrt.export.verify as verify

    monkeypatch.setattr(verify, "FP32_TOLERANCE", (0.0, 0.0))  # any float difference is now too much
    _fails(capsys, ["export", str(tiny_sd2), "--out", str(tmp_path / "o")], "verification failed", "text_encoder")
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not any(p.name.startswith(".sdrt-tmp-") for p in (tmp_path / "o").iterdir())


def test_forced_reexport_removes_the_old_manifest_before_writing(tiny_sd2, export_into, tmp_path, monkeypatch):
    out = export_into(tiny_sd2, tmp_path / "o", verify=False)
    import sdrt.export.exporter as exporter

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed during the U-Net
    real = exporter._export_stage
    monkeypatch.setattr(exporter, "_export_stage",
                        lambda ckpt, facts, spec, *a: crash() if spec.stage.value == "unet" else real(ckpt, facts, spec, *a))
    with pytest.raises(KeyboardInterrupt):
        export_into(tiny_sd2, out, verify=False, force=True)
    with pytest.raises(ArtifactError, match="incomplete"):
        load_manifest(out)


def test_killed_export_leaves_an_incomplete_folder_and_a_rerun_redoes_it(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli.main", "export", str(tiny_sd15), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        # Kill it while the U-Net is being exported (its work folder exists).
        deadline = time.monotonic() + 240
        while not (out.is_dir() and any(p.name.startswith(".sdrt-tmp-unet") for p in out.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "export ended before the U-Net stage"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert (out / "text_encoder.onnx").exists() and not (out / "manifest.json").exists()
    with pytest.raises(ArtifactError, match="incomplete"):
        load_manifest(out)
    assert main(["export", str(tiny_sd15), "--out", str(out), "--no-verify"]) == 0
    assert "leftovers of an interrupted export" in capsys.readouterr().err
    load_manifest(out)
    assert not any(p.name.startswith(".sdrt-tmp-") for p in out.iterdir())


def test_tiny_model_command_refuses_an_existing_folder(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    _fails(capsys, ["tiny-model", str(tmp_path / "m")], "already exists")


def test_cli_parser_does_not_import_torch():
    code = ("import sys; from sdrt.cli.main import build_parser; build_parser(); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp16_without_the_precision_module_is_refused_before_any_work(capsys, tiny_sd15, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sdrt.export.precision", None)  # import now fails, as in a build without it
    _fails(capsys, ["export", str(tiny_sd15), "--out", str(tmp_path / "o"), "--precision", "fp16"], "fp16", "fp32")
    assert not (tmp_path / "o").exists()


def test_truncated_weight_file_is_a_one_line_error(capsys, tiny_sd15, tmp_path):
    ckpt = tmp_path / "truncated"
    shutil.copytree(tiny_sd15, ckpt)
    weights = ckpt / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _fails(capsys, ["export", str(ckpt), "--out", str(tmp_path / "o")], "model.safetensors", "cannot load")
    with pytest.raises(ArtifactError):
        load_manifest(tmp_path / "o")


def test_fp16_variant_weights_are_loaded_and_exported_in_fp32(tiny_sd2, tmp_path, capsys):
    """Hub checkpoints often ship only `*.fp16.safetensors`; export upcasts them."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "variant"
    shutil.copytree(tiny_sd2, ckpt)
    plain = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(plain).items()}, ckpt / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    plain.unlink()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "o")]) == 0
    manifest = load_manifest(tmp_path / "o")
    assert manifest.precisions and manifest.verification["unet"]["passed"]
    # The verification table is the command's output (progress went to stderr).
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [(r[0], r[-1]) for r in rows if r and r[0] in ("text_encoder", "unet", "vae_decoder")] == [
        ("text_encoder", "ok"), ("unet", "ok"), ("vae_decoder", "ok")]
