"""The runtime never loads torch, diffusers or transformers (STYLE.md, habit 4):
checked in a fresh interpreter, after a whole generation through the API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "scipy")

SCRIPT = """
import json, sys
import sdrt.runtime
after_import = sorted(m for m in sys.modules if m.split('.')[0] in {heavy})
from sdrt.runtime import Pipeline
from sdrt.cli.main import main
pipe = Pipeline.load({folder!r})
result = pipe("a fox", steps=2, scheduler="euler_a", seed=1)
rc = main(["generate", {folder!r}, "--prompt", "a fox", "--steps", "2", "--out", {out!r}])
print(json.dumps({{"rc": rc, "shape": list(result.pixels.shape), "after_import": after_import,
                  "after_run": sorted(m for m in sys.modules if m.split('.')[0] in {heavy})}}))
"""


def test_import_and_generation_never_load_torch_diffusers_or_transformers(sd15_artifacts, tmp_path):
    code = SCRIPT.format(heavy=set(HEAVY), folder=str(sd15_artifacts), out=str(tmp_path / "x.png"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0 and (tmp_path / "x.png").is_file()
    assert len(report["shape"]) == 4          # a generation really ran
    assert report["after_import"] == []
    assert report["after_run"] == []


def test_sdrt_build_and_the_backend_registry_import_no_torch_export_runtime_or_backend_library():
    # `sdrt build` runs on a runtime-only install (a Jetson board): engines/build.py
    # needs no torch; listing the backends (for --help) loads no backend library.
    code = ("import json, sys\n"
            "import sdrt.engines.build, sdrt.engines.registry as r\n"
            "[r.fields(n) for n in r.names()]; [r.describe(n) for n in r.names()]\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy} | {{'openvino', 'tensorrt'}}"
            " or m.startswith(('sdrt.export', 'sdrt.runtime')))))\n").format(heavy=set(HEAVY))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
