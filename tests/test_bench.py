"""`sdrt bench`: the --json report has the documented fields (no timing assertions:
benchmarks are not tests), and bad input is refused at the edge."""

from __future__ import annotations

import json

import pytest

from sdrt.cli.main import main

RUNS, STEPS = 2, 3
STAT_FIELDS = {"n", "median_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "p10_ms"}
FIGURES = {"text_encoder", "unet_step", "host_step", "step", "vae_decoder", "other", "end_to_end"}


def test_bench_json_has_documented_fields(sd15_artifacts, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", str(sd15_artifacts), "--runs", str(RUNS), "--warmup", "1", "--steps", str(STEPS),
                 "--scheduler", "euler", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())

    assert report["schema"] == "sdrt-bench" and report["schema_version"] == 1
    assert {"cpu", "logical_cpus", "usable_cpus", "ram_bytes", "os", "python"} <= set(report["machine"])
    assert report["versions"]["onnxruntime"] and report["versions"]["numpy"]
    assert report["backend"] == "onnxruntime"
    s = report["settings"]
    assert (s["steps"], s["runs"], s["warmup"], s["scheduler"]) == (STEPS, RUNS, 1, "euler")
    assert {"height", "width", "batch", "cfg", "precisions", "artifact_dir", "prompt", "guidance"} <= set(s)

    figures = report["figures"]
    assert set(figures) == FIGURES
    for name, f in figures.items():
        assert set(f) == STAT_FIELDS, name
        assert f["min_ms"] <= f["median_ms"] <= f["p90_ms"] <= f["p99_ms"] <= f["max_ms"], name
    # Per-step figures pool every step of every measured run; per-generation ones one value per run.
    for name in ("unet_step", "host_step", "step"):
        assert figures[name]["n"] == RUNS * STEPS
    for name in ("text_encoder", "vae_decoder", "other", "end_to_end"):
        assert figures[name]["n"] == RUNS
    # Host work is what is left of a step after the U-Net: never more than the step.
    assert figures["host_step"]["max_ms"] <= figures["step"]["max_ms"]
    assert report["images_per_second"] > 0
    assert report["memory"]["peak_rss_bytes"] > 0
    assert report["memory"]["peak_gpu_bytes"] is None    # ONNX Runtime on CPU: n/a

    printed = capsys.readouterr().out
    assert "host_step" in printed and "images/s" in printed


@pytest.mark.parametrize("args, words", [
    (["--runs", "0"], ["runs 0", "1 to"]),
    (["--steps", "-3"], ["steps -3", "1 to"]),
    (["--backend", "cuda-graphs"], ["cuda-graphs", "onnxruntime"]),
])
def test_bench_rejects_bad_settings_naming_value_and_range(sd15_artifacts, args, words, capsys):
    assert main(["bench", str(sd15_artifacts), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


def test_bench_refuses_to_overwrite_json_without_force(sd15_artifacts, tmp_path, capsys):
    out = tmp_path / "mine.json"
    out.write_text("user data")
    assert main(["bench", str(sd15_artifacts), "--runs", "1", "--json", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == "user data"


def test_bench_runs_a_no_cfg_artifact_at_its_default_guidance(tiny_sd15, export_into, tmp_path):
    folder = export_into(tiny_sd15, tmp_path / "nocfg", cfg=False, verify=False)
    out = tmp_path / "bench.json"
    assert main(["bench", str(folder), "--runs", "1", "--warmup", "0", "--steps", "2", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["settings"]
    assert (s["cfg"], s["guidance"], s["steps"]) == (False, 1.0, 2)


def test_bench_guidance_is_checked_against_the_artifact_before_loading(tiny_sd15, export_into, tmp_path, capsys):
    folder = export_into(tiny_sd15, tmp_path / "nocfg", cfg=False, verify=False)
    assert main(["bench", str(folder), "--runs", "1", "--guidance", "7.5"]) == 2
    err = capsys.readouterr().err
    assert "guidance 7.5 needs classifier-free guidance" in err and f"loading {folder} on" not in err
    assert main(["bench", str(folder), "--runs", "1", "--warmup", "0", "--steps", "1", "--guidance", "0.5"]) == 0
