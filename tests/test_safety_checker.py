"""The safety checker against diffusers: StableDiffusionPipeline with the checkpoint's
StableDiffusionSafetyChecker and CLIPImageProcessor (the oracle), same weights, prompts
and seed, gives the same per-image flags and the same pixels, black where flagged.

The tiny checkpoint's random-weight checker flags nothing (every threshold is 1.0), so
the cases lower thresholds in copies of it, placed from the oracle's own cosine
similarities: one concept's threshold between the two batch items' (one image flagged,
the other not), and thresholds just above every image's cosine with every special-care
concept matched (flagged only through diffusers' special-care adjustment).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdrt.engines.errors import ArtifactError, InvalidType
from sdrt.engines.specs import Stage
from sdrt.runtime import Pipeline
from sdrt.runtime.artifact import Artifact
from sdrt.runtime.safety import PREPROCESSOR_CONFIG, ClipImageProcessing, flags

TOL = 1e-4
PROMPTS = ["a watercolor fox", "a red sports car"]
SEED, STEPS = 1, 3
WEIGHTS = "safety_checker/model.safetensors"


def _torch_one_thread():
    import torch
    torch.set_num_threads(1)   # see tests/test_pipeline.py: 2 shared cores


def _diffusers(model_dir, safety_checker=True):
    """The oracle's output for PROMPTS and SEED: (pixels, nsfw flags or None)."""
    import diffusers
    import torch
    _torch_one_thread()
    kwargs = {} if safety_checker else dict(safety_checker=None, requires_safety_checker=False)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(SEED),
                   output_type="np")
    return out.images, out.nsfw_content_detected


def _oracle_cosines(model_dir, pixels):
    """diffusers' own cosine similarities of `pixels` (its unflagged output) to the
    special-care and the other concepts, computed with its modules."""
    import diffusers
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir)
    checker = pipe.safety_checker
    clip = pipe.feature_extractor(pipe.image_processor.numpy_to_pil(pixels), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip)[1])
        return (cosine_distance(embeds, checker.special_care_embeds).numpy(),
                cosine_distance(embeds, checker.concept_embeds).numpy())


def _with_thresholds(src, dst, concept, special):
    """A copy of checkpoint `src` whose checker has these concept thresholds."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    weights = load_file(dst / WEIGHTS)
    weights["concept_embeds_weights"] = np.asarray(concept, np.float32)
    weights["special_care_embeds_weights"] = np.asarray(special, np.float32)
    save_file(weights, dst / WEIGHTS, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def tiny_safety(tmp_path_factory):
    from sdrt.export.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd15-safety", variant="sd15-safety")


@pytest.fixture(scope="module")
def unflagged(tiny_safety):
    """diffusers' images with the shipped thresholds (nothing flagged), and its cosines."""
    pixels, nsfw = _diffusers(tiny_safety)
    assert nsfw == [False, False]
    return pixels, _oracle_cosines(tiny_safety, pixels)


@pytest.fixture(scope="module")
def cases(tiny_safety, unflagged, tmp_path_factory, export_into):
    """case -> (checkpoint folder, loaded sdrt Pipeline of its batch-2 export)."""
    _, (special_cos, concept_cos) = unflagged
    # mixed: one concept's threshold halfway between the two images' cosines
    j = int(np.argmax(np.abs(concept_cos[0] - concept_cos[1])))
    assert abs(concept_cos[0, j] - concept_cos[1, j]) > 0.01, "the two images are too alike to split"
    mixed = np.ones(17)
    mixed[j] = (concept_cos[0, j] + concept_cos[1, j]) / 2
    # special: every special-care concept matched (threshold -1: adjustment 0.01), every
    # concept threshold 0.005 above the highest cosine: only the adjustment can flag.
    special = concept_cos.max(axis=0) + 0.005
    root = tmp_path_factory.mktemp("safety-cases")
    out = {}
    for name, concept, special_t in (("mixed", mixed, np.ones(3)), ("special", special, -np.ones(3))):
        model = _with_thresholds(tiny_safety, root / f"model-{name}", concept, special_t)
        art = export_into(model, root / f"art-{name}", batch=2, vae_encoder=False, verify=False)
        out[name] = (model, Pipeline.load(art))
    return out


@pytest.mark.parametrize("case", ["mixed", "special"])
def test_flags_and_blacked_out_pixels_match_diffusers(cases, case, unflagged):
    model, pipe = cases[case]
    want_pixels, want_flags = _diffusers(model)
    result = pipe(PROMPTS, steps=STEPS, seed=SEED)
    assert result.nsfw_content_detected == want_flags
    assert any(want_flags)
    if case == "mixed":
        assert want_flags.count(True) == 1   # the batch is split, as the thresholds were placed
    assert float(np.abs(result.pixels - want_pixels).max()) <= TOL
    for flagged, image, pixels, before in zip(want_flags, result.images, result.pixels, unflagged[0]):
        if flagged:
            assert not pixels.any() and not np.asarray(image).any()   # black, pixels and PNG alike
        else:
            assert np.abs(pixels - before).max() <= TOL
            assert np.array_equal(np.asarray(image), (pixels * 255).round().astype(np.uint8))


def test_safety_checker_false_skips_it_as_diffusers_without_one(cases, unflagged):
    _, pipe = cases["mixed"]
    result = pipe(PROMPTS, steps=STEPS, seed=SEED, safety_checker=False)
    assert result.nsfw_content_detected is None
    assert float(np.abs(result.pixels - unflagged[0]).max()) <= TOL   # nothing blacked out
    with pytest.raises(InvalidType, match="safety_checker must be True or False"):
        pipe(PROMPTS, steps=STEPS, seed=SEED, safety_checker="no")


def test_flags_follow_diffusers_forward_near_the_thresholds():
    """The rounding and the special-care adjustment on many scores, against the
    checker's own forward: thresholds at cosine quantiles put scores near 0 and +-0.01."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from transformers import CLIPConfig
    _torch_one_thread()
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8), projection_dim=8)
    checker = StableDiffusionSafetyChecker(config).eval()
    clip = torch.randn(256, 3, 16, 16)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        embeds = checker.visual_projection(checker.vision_model(clip)[1])
        special_cos = cosine_distance(embeds, checker.special_care_embeds)
        concept_cos = cosine_distance(embeds, checker.concept_embeds)
        checker.special_care_embeds_weights.copy_(torch.quantile(special_cos, 0.9, dim=0))
        checker.concept_embeds_weights.copy_(torch.quantile(concept_cos, 0.995, dim=0))
        _, want = checker(clip_input=clip, images=np.zeros((256, 1)))
        got = flags((special_cos - checker.special_care_embeds_weights).numpy(),
                    (concept_cos - checker.concept_embeds_weights).numpy())
    assert 10 < sum(want) < 246   # a mix, so the rule is exercised both ways
    assert got == want


@pytest.mark.parametrize("config", [
    {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}},   # the tiny checkpoint's
    {"size": 224, "crop_size": 224, "feature_extractor_type": "CLIPFeatureExtractor"},   # SD 1.5's (old style)
    {"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 28}, "resample": 2},   # crop pads
    {"size": {"height": 30, "width": 20}, "do_center_crop": False, "do_normalize": False},
    {"do_resize": False, "crop_size": {"height": 17, "width": 33}, "image_mean": 0.5, "image_std": [0.5, 0.4, 0.3]},
])
def test_preprocessing_matches_transformers_clip_image_processor(config):
    """transformers' CLIPImageProcessor (what diffusers' feature extractor is) on odd
    image sizes, portrait and landscape."""
    from transformers import CLIPImageProcessor
    oracle = CLIPImageProcessor(**config)
    ours = ClipImageProcessing.from_config(json.loads(oracle.to_json_string()), "test")
    rng = np.random.default_rng(0)
    for h, w in ((37, 53), (53, 37), (31, 31), (20, 90), (128, 128), (513, 300)):
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(2)]
        want = oracle(images, return_tensors="np").pixel_values
        got = ours(images)
        assert got.shape == want.shape and got.shape[2:] == ours.output_size(h, w)
        assert float(np.abs(got - want).max()) <= 1e-6, (h, w)


def test_export_records_the_stage_and_the_feature_extractor(cases):
    _, pipe = cases["mixed"]
    m = pipe.manifest
    assert m.stages[-1] is Stage.SAFETY_CHECKER and m.facts.safety_image_size == 32
    assert PREPROCESSOR_CONFIG in m.files


def _replace_config(folder, text):
    """Write the artifact's feature extractor config and record it in the manifest, as
    a hand-edited (or hostile) artifact would: only the config's own checks can catch it."""
    import hashlib
    (folder / PREPROCESSOR_CONFIG).write_text(text, encoding="utf-8")
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"][PREPROCESSOR_CONFIG] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "size": len(text)}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.parametrize("text, message", [
    ("{ not json", "preprocessor_config.json"),
    ('{"crop_size": {"height": 24, "width": 24}}', "crop_size 24x24 differs from the safety checker's input 32x32"),
    ('{"size": "large"}', "size 'large' is not supported"),
    ('{"image_std": [0.5, 0, 0.5]}', "image_std must be positive"),
    ('{"resample": 9}', "resample 9 is not a PIL filter"),
])
def test_corrupt_preprocessor_config_fails_at_open(cases, tmp_path, text, message):
    _, pipe = cases["mixed"]
    folder = shutil.copytree(pipe.folder, tmp_path / "art")
    _replace_config(folder, text)
    with pytest.raises(ArtifactError, match=message):
        Artifact.open(folder)


def test_missing_preprocessor_config_fails_at_open(cases, tmp_path):
    _, pipe = cases["mixed"]
    folder = shutil.copytree(pipe.folder, tmp_path / "art")
    (folder / PREPROCESSOR_CONFIG).unlink()
    with pytest.raises(ArtifactError, match="preprocessor_config.json: missing"):
        Artifact.open(folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    del manifest["files"][PREPROCESSOR_CONFIG]   # not even listed: the checker still needs it
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="preprocessor_config.json is missing: the safety checker needs"):
        Artifact.open(folder)


def _sdrt(*args):
    return subprocess.run([sys.executable, "-m", "sdrt.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_reports_flagged_items_and_no_safety_checker_skips_it(cases, tmp_path):
    _, pipe = cases["mixed"]
    run = _sdrt("generate", pipe.folder, "--prompt", PROMPTS[0], "--steps", STEPS, "--seed", SEED,
                "--out", tmp_path / "a.png")
    assert run.returncode == 0, run.stderr
    flagged = pipe(PROMPTS[0], steps=STEPS, seed=SEED).nsfw_content_detected
    assert any(flagged), "no item of this prompt is flagged: the stderr report goes untested"
    lines = [line for line in run.stderr.splitlines() if "safety checker" in line]
    assert len(lines) == (1 if any(flagged) else 0)
    for i, f in enumerate(flagged):
        name = "a.png" if i == 0 else f"a-{i}.png"
        assert (f"item {i} (" in "".join(lines) or f"items {i}" in "".join(lines)) == f
        assert (not np.asarray(Image.open(tmp_path / name)).any()) == f
    run = _sdrt("generate", pipe.folder, "--prompt", PROMPTS[0], "--steps", STEPS, "--seed", SEED,
                "--out", tmp_path / "b.png", "--no-safety-checker")
    assert run.returncode == 0, run.stderr
    assert "safety checker" not in run.stderr
    assert all(np.asarray(Image.open(tmp_path / n)).any() for n in ("b.png", "b-1.png"))


def test_export_no_safety_checker_leaves_it_out(tiny_safety, tmp_path):
    run = _sdrt("export", tiny_safety, "--out", tmp_path / "art", "--no-safety-checker", "--no-vae-encoder",
                "--no-verify")
    assert run.returncode == 0, run.stderr
    assert "leaving out the checkpoint's safety checker" in run.stdout + run.stderr
    info = _sdrt("info", tmp_path / "art")
    assert "no safety checker" in info.stdout
    pipe = Pipeline.load(tmp_path / "art")
    assert Stage.SAFETY_CHECKER not in pipe.manifest.stages and not (tmp_path / "art" / PREPROCESSOR_CONFIG).exists()
    assert pipe("a fox", steps=2, seed=0).nsfw_content_detected is None
