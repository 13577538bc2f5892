"""DeepCache against its reference: the authors' DeepCacheSDHelper (the DeepCache
package) applied to diffusers' own U-Net in diffusers' pipelines, same seed, pixels
within 1e-4, at intervals 2, 3 and 5; and the non-uniform schedule against the
reference's `sample_from_quad_center` itself.

The helper skips a block by returning that block's output from the last full step;
sdrt exports the blocks that still run as a separate graph. Matching pixels mean the
two agree on which blocks run, which feature is cached, and which steps are full.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from sdrt.engines.errors import ArtifactError, InvalidInput
from sdrt.runtime import Pipeline
from sdrt.runtime.deepcache import CacheSchedule, quad_center_steps
from sdrt.runtime.schedulers import diffusers_scheduler

DeepCache = pytest.importorskip("DeepCache", reason="the DeepCache package (dev extra) is the reference")

TOL = 1e-4
PROMPT = "a watercolor fox, highly detailed"


class Reference:
    """A diffusers pipeline of the checkpoint with the DeepCache helper around its U-Net."""

    def __init__(self, model_dir: Path, cls_name: str):
        import diffusers
        index = json.loads((model_dir / "model_index.json").read_text())
        base = getattr(diffusers, index["_class_name"]).from_pretrained(model_dir)
        self.config = base.scheduler.config
        self.pipe = getattr(diffusers, cls_name)(**base.components)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, interval: int, scheduler: str, seed: int, full_steps=None, **kw) -> np.ndarray:
        import diffusers
        import torch
        cls_name, overrides = diffusers_scheduler(scheduler, self.config)
        self.pipe.scheduler = getattr(diffusers, cls_name).from_config(self.config, **overrides)
        helper = DeepCache.DeepCacheSDHelper(pipe=self.pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        if full_steps is not None:
            # The reference's non-uniform schedule lives in its pipeline copies, which do
            # not import with today's diffusers: the helper gets that schedule's full steps.
            plain = helper.is_skip_step

            def is_skip_step(block_i, layer_i, blocktype="down"):
                helper.start_timestep = helper.cur_timestep if helper.start_timestep is None else helper.start_timestep
                if helper.cur_timestep - helper.start_timestep in full_steps:
                    return False
                helper.params["skip_mode"] = "non-uniform"   # the helper's skip rules, no uniform shortcut
                return plain(block_i, layer_i, blocktype)
            helper.is_skip_step = is_skip_step
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        helper.enable()
        try:
            with torch.no_grad():
                return self.pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images
        finally:
            helper.disable()
            torch.set_num_threads(threads)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture(scope="module")
def sd15_deepcache(tiny_sd15, export_into, tmp_path_factory):
    return Pipeline.load(export_into(tiny_sd15, tmp_path_factory.mktemp("dc") / "sd15", deepcache=True))


@pytest.fixture(scope="module")
def sd15_reference(tiny_sd15):
    return Reference(tiny_sd15, "StableDiffusionPipeline")


@pytest.mark.parametrize("interval", [2, 3, 5])
@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "ddim"])
def test_matches_the_deepcache_helper_on_diffusers(sd15_deepcache, sd15_reference, interval, scheduler):
    h, w = sd15_deepcache.height, sd15_deepcache.width
    want = sd15_reference(interval, scheduler, 7, prompt=PROMPT, num_inference_steps=11, height=h, width=w)
    got = sd15_deepcache(PROMPT, steps=11, scheduler=scheduler, seed=7, cache_interval=interval)
    exact = sd15_deepcache(PROMPT, steps=11, scheduler=scheduler, seed=7)
    assert _max_diff(got.pixels, want) <= TOL
    assert _max_diff(got.pixels, exact.pixels) > 10 * TOL   # the shallow steps ran: the image changed


def test_interval_one_is_the_exact_path(sd15_deepcache, sd15_artifacts):
    plain = Pipeline.load(sd15_artifacts)
    a = sd15_deepcache(PROMPT, steps=6, seed=2, cache_interval=1)
    b = plain(PROMPT, steps=6, seed=2)
    assert np.array_equal(a.pixels, b.pixels)   # the extra feature output changes nothing


def test_image_to_image_counts_steps_from_its_first(sd15_deepcache, tiny_sd15):
    ref = Reference(tiny_sd15, "StableDiffusionImg2ImgPipeline")
    rng = np.random.default_rng(0)
    image = (rng.uniform(0, 1, (sd15_deepcache.height, sd15_deepcache.width, 3)) * 255).astype(np.uint8)
    from PIL import Image
    pil = Image.fromarray(image)
    want = ref(3, "euler", 5, prompt=PROMPT, image=pil, strength=0.7, num_inference_steps=10)
    got = sd15_deepcache(PROMPT, image=pil, strength=0.7, steps=10, scheduler="euler", seed=5, cache_interval=3)
    assert _max_diff(got.pixels, want) <= TOL


def test_non_uniform_schedule_matches_the_reference(sd15_deepcache, sd15_reference):
    steps, interval, center, pow_ = 12, 3, 4, 1.4
    full = set(quad_center_steps(steps, 4, center, pow_))
    h, w = sd15_deepcache.height, sd15_deepcache.width
    want = sd15_reference(interval, "euler", 9, full_steps=full, prompt=PROMPT, num_inference_steps=steps,
                          height=h, width=w)
    got = sd15_deepcache(PROMPT, steps=steps, scheduler="euler", seed=9, cache_interval=interval,
                         cache_uniform=False, cache_center=center, cache_pow=pow_)
    assert _max_diff(got.pixels, want) <= TOL


def _reference_quad_center():
    """`sample_from_quad_center`, the reference's own source, taken from the DeepCache
    package (its module imports diffusers names that no longer exist, so the function
    is compiled alone)."""
    origin = Path(importlib.util.find_spec("DeepCache").origin).parent / "sd" / "pipeline_stable_diffusion.py"
    tree = ast.parse(origin.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    namespace = {"np": np}
    exec(compile(ast.Module([fn], []), str(origin), "exec"), namespace)
    return namespace["sample_from_quad_center"]


def test_quad_center_steps_are_the_references():
    reference = _reference_quad_center()
    compared = refused = 0
    for total in range(4, 60, 3):
        for interval in (2, 3, 5):
            count = -(-total // interval)
            for center in range(1, total, 2):
                for pow_ in (1.2, 1.4, 2.0):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")   # its complex-to-int cast warns
                        try:
                            want = [int(v) for v in reference(total, count, center, pow_)[0]]
                        except ValueError:
                            want = None
                    if want is None:
                        refused += 1
                        with pytest.raises(InvalidInput, match="non-uniform DeepCache schedule"):
                            quad_center_steps(total, count, center, pow_)
                    else:
                        compared += 1
                        assert quad_center_steps(total, count, center, pow_) == want, (total, count, center, pow_)
    assert compared > 500 and refused > 0


def test_uniform_full_calls_share_a_step_for_second_order_samplers():
    schedule = CacheSchedule.create(3)
    assert schedule.full_calls(7, 1) == (True, False, False, True, False, False, True)
    # Heun: calls (0, 1) are step 0, (2, 3) step 1, ... each step's calls run alike.
    assert schedule.full_calls(9, 2) == (True, True, False, False, False, False, True, True, False)


@pytest.mark.parametrize("kwargs, message", [
    ({"cache_interval": 0}, "cache_interval must be an integer from 1"),
    ({"cache_interval": 2.5}, "cache_interval must be an integer"),
    ({"cache_interval": True}, "cache_interval must be an integer"),
    ({"cache_interval": 3, "cache_center": 4}, "pass cache_uniform=False"),
    ({"cache_interval": 3, "cache_uniform": False, "cache_pow": 1.0}, r"cache_pow must be a number in \(1, 10\]"),
    ({"cache_interval": 3, "cache_uniform": False, "cache_center": 40}, "must be below the number of steps"),
    ({"cache_interval": 3, "cache_uniform": "no"}, "cache_uniform must be True or False"),
])
def test_bad_settings_are_refused_naming_the_value(sd15_deepcache, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        sd15_deepcache(PROMPT, steps=10, seed=1, **kwargs)


def test_an_artifact_without_the_shallow_unet_says_how_to_get_it(sd15_artifacts):
    pipe = Pipeline.load(sd15_artifacts)
    with pytest.raises(InvalidInput, match="export it with --deepcache"):
        pipe(PROMPT, steps=4, cache_interval=2)


def test_manifest_says_whether_it_carries_the_shallow_graph(sd15_deepcache, tmp_path):
    from sdrt.engines.manifest import read_manifest
    m = sd15_deepcache.manifest
    assert m.shape.deepcache and "unet_shallow" in [s.value for s in m.stages]
    assert "deepcache_feature" in [t.name for t in m.specs[m.stages[1]].outputs]
    # A hand-edited manifest claiming the graph without its stage is refused.
    data = json.loads((sd15_deepcache.folder / "manifest.json").read_text())
    data["stages"] = [s for s in data["stages"] if s["name"] != "unet_shallow"]
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="shape deepcache is True but the stages lack unet_shallow"):
        read_manifest(folder)


def test_png_records_the_interval(sd15_deepcache):
    result = sd15_deepcache(PROMPT, steps=6, seed=1, cache_interval=2)
    assert "DeepCache: 2," in result.parameters


@pytest.mark.slow   # 18 s; SD 1.5's DeepCache parity runs by default
def test_sdxl_matches_the_deepcache_helper(tmp_path_factory, export_into, tiny_sdxl):
    """SDXL's last up block has no attention: the shallow graph is a resnet alone, with
    the added (pooled text, size) conditions in the time embedding."""
    model = tiny_sdxl
    pipe = Pipeline.load(export_into(model, tmp_path_factory.mktemp("dc") / "sdxl", deepcache=True))
    ref = Reference(model, "StableDiffusionXLPipeline")
    want = ref(3, "euler", 4, prompt=PROMPT, num_inference_steps=7, guidance_scale=5.0, height=pipe.height,
               width=pipe.width)
    got = pipe(PROMPT, steps=7, scheduler="euler", seed=4, guidance=5.0, cache_interval=3)
    assert _max_diff(got.pixels, want) <= TOL


def test_cli_deepcache_writes_it_into_the_png_and_from_png_repeats_it(sd15_deepcache, tmp_path):
    from PIL import Image

    from sdrt.cli.main import main
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    folder = str(sd15_deepcache.folder)
    assert main(["generate", folder, "--prompt", PROMPT, "--steps", "8", "--seed", "3", "--deepcache", "3",
                 "--deepcache-nonuniform", "--deepcache-center", "3", "--out", str(first)]) == 0
    assert "DeepCache: 3 non-uniform center 3 pow 1.4," in Image.open(first).info["parameters"]
    assert main(["generate", folder, "--from-png", str(first), "--out", str(again)]) == 0
    want = sd15_deepcache(PROMPT, steps=8, seed=3, cache_interval=3, cache_uniform=False, cache_center=3)
    for path in (first, again):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(want.images[0]))


def test_cli_refuses_deepcache_on_an_artifact_without_it(sd15_artifacts, tmp_path, capsys):
    from sdrt.cli.main import main
    assert main(["generate", str(sd15_artifacts), "--prompt", PROMPT, "--deepcache", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "export it with --deepcache" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_export_cli_deepcache_flag(tiny_sd15, tmp_path):
    from sdrt.cli.main import main
    from sdrt.engines.manifest import read_manifest
    assert main(["export", str(tiny_sd15), "--out", str(tmp_path / "a"), "--deepcache", "--no-verify"]) == 0
    m = read_manifest(tmp_path / "a")
    assert m.shape.deepcache and (tmp_path / "a" / "unet_shallow.onnx").is_file()


def test_info_says_whether_the_artifact_carries_deepcache(sd15_deepcache, sd15_artifacts, capsys):
    from sdrt.cli.main import main
    assert main(["info", str(sd15_deepcache.folder)]) == 0
    assert "deepcache     yes" in capsys.readouterr().out
    assert main(["info", str(sd15_artifacts)]) == 0
    assert "deepcache     no (export with --deepcache" in capsys.readouterr().out


@pytest.mark.parametrize("interval", [2, 3])
def test_deepcache_runs_alike_on_the_openvino_backend(sd15_deepcache, interval):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    ov = Pipeline.load(sd15_deepcache.folder, backend="openvino")
    want = sd15_deepcache(PROMPT, steps=8, seed=6, cache_interval=interval)
    got = ov(PROMPT, steps=8, seed=6, cache_interval=interval)
    assert _max_diff(got.pixels, want.pixels) <= TOL
    assert ov.engines.keys() == sd15_deepcache.engines.keys()   # the shallow U-Net too


def test_bench_times_deepcache_and_says_so(sd15_deepcache, capsys):
    from sdrt.cli.main import main
    assert main(["bench", str(sd15_deepcache.folder), "--steps", "6", "--runs", "1", "--warmup", "0",
                 "--deepcache", "3"]) == 0
    out = capsys.readouterr().out
    assert "DeepCache interval 3" in out


@pytest.mark.slow   # 11 s: a full fp16 export; fp16 export itself is tests/test_fp16.py's
def test_fp16_export_converts_the_shallow_unet_and_deepcache_runs_on_it(tiny_sd15, export_into, tmp_path,
                                                                       sd15_deepcache):
    """Export verifies every fp16 graph (the shallow one included) against torch; the fp16
    artifact's DeepCache image stays within fp16 rounding of the fp32 one."""
    from sdrt.engines.specs import Precision
    folder = export_into(tiny_sd15, tmp_path / "fp16", precision=Precision.FP16, deepcache=True)
    pipe = Pipeline.load(folder)
    assert pipe.manifest.precisions[pipe.manifest.stages[2]] is Precision.FP16   # unet_shallow
    got = pipe(PROMPT, steps=6, seed=1, cache_interval=2)
    want = sd15_deepcache(PROMPT, steps=6, seed=1, cache_interval=2)
    assert _max_diff(got.pixels, want.pixels) <= 2e-2
