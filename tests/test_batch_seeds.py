"""A seed per batch item: `Pipeline(..., seed=[a, b])` on a batch-2 artifact against
diffusers on CPU with `generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]`
(each draw split per item by `randn_tensor`, image-to-image encoding the image once per
item), and the property a server packing independent requests relies on: item i is
the image a batch-1 artifact gives for seeds[i].
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdrt.cli.main import main
from sdrt.engines.errors import InvalidInput, InvalidType
from sdrt.runtime import Pipeline
from sdrt.runtime.config import GenerationConfig
from sdrt.runtime.images import read_parameters
from sdrt.runtime.schedulers import diffusers_scheduler

TOL = 1e-4          # max abs on pixels in [0, 1] against diffusers, as tests/test_same_seed.py
SAME_TOL = 1e-5     # batch 2 against batch 1: the same numbers, only the engines' batch differs
PROMPTS = ["a watercolor fox, highly detailed", "a red barn in the snow"]
NEGATIVE = "blurry"
SEEDS = [7, 2**40 + 3]


class Oracle:
    """diffusers' txt2img, img2img and inpaint pipelines of one checkpoint folder."""

    def __init__(self, model_dir):
        import diffusers
        base = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                                 requires_safety_checker=False)
        self.config = base.scheduler.config
        self.pipes = {"txt2img": base, "img2img": diffusers.StableDiffusionImg2ImgPipeline(**base.components),
                      "inpaint": diffusers.StableDiffusionInpaintPipeline(**base.components)}
        for p in self.pipes.values():
            p.set_progress_bar_config(disable=True)

    def __call__(self, task, scheduler, seeds, **kw):
        import diffusers
        import torch
        pipe = self.pipes[task]
        cls_name, overrides = diffusers_scheduler(scheduler, self.config)
        pipe.scheduler = getattr(diffusers, cls_name).from_config(self.config, **overrides)
        generator = [torch.Generator("cpu").manual_seed(s) for s in seeds] if isinstance(seeds, list) else \
            torch.Generator("cpu").manual_seed(seeds)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # see tests/test_pipeline.py: OpenMP threads spinning on 2 cores
        try:
            with torch.no_grad():
                return pipe(generator=generator, output_type="np", **kw).images
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle(tiny_sd15):
    return Oracle(tiny_sd15)


@pytest.fixture(scope="module")
def b1(sd15_artifacts):
    return Pipeline.load(sd15_artifacts)


@pytest.fixture(scope="module")
def b2(sd15_batch2_artifacts):
    return Pipeline.load(sd15_batch2_artifacts)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _photo(width, height):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 7.0 + y / 11.0)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def _circle(width, height):
    m = Image.new("L", (width, height), 0)
    ImageDraw.Draw(m).ellipse([width // 5, height // 5, 4 * width // 5, 4 * height // 5], fill=255)
    return m


def _seed_in(text):
    return int(re.search(r"\bSeed: (\d+)", text).group(1))


def test_text_to_image_with_a_seed_per_item_matches_diffusers_generator_list(b2, oracle):
    result = b2(PROMPTS, negative_prompt=NEGATIVE, steps=4, guidance=7.5, scheduler="euler_a", seed=SEEDS)
    want = oracle("txt2img", "euler_a", SEEDS, prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=4,
                  guidance_scale=7.5, height=b2.height, width=b2.width)
    diff = _max_diff(result.pixels, want)
    print(f"txt2img euler_a max diff {diff:.3g}")
    assert diff <= TOL
    # What is recorded: the seeds, the first as `seed`, and each image's own in its PNG text.
    assert result.config.seeds == tuple(SEEDS) and result.config.seed == SEEDS[0] == result.seed
    assert result.seeds == tuple(SEEDS)
    assert [_seed_in(im.info["parameters"]) for im in result.images] == SEEDS
    assert result.parameters == result.images[0].info["parameters"]


def test_image_to_image_with_a_seed_per_item_matches_diffusers_generator_list(b2, oracle):
    image = _photo(b2.width, b2.height)
    ours = b2(PROMPTS, image=image, strength=0.7, steps=5, scheduler="euler_a", seed=SEEDS).pixels
    want = oracle("img2img", "euler_a", SEEDS, prompt=PROMPTS, image=image, strength=0.7, num_inference_steps=5)
    diff = _max_diff(ours, want)
    print(f"img2img euler_a max diff {diff:.3g}")
    assert diff <= TOL


def test_inpainting_with_a_seed_per_item_samples_the_one_image_from_the_first_seed_as_diffusers(b2, oracle):
    """StableDiffusionInpaintPipeline's _encode_vae_image draws the input (and masked)
    image's latent sample with shape (1, ...), i.e. from the first generator only."""
    image, mask = _photo(b2.width, b2.height), _circle(b2.width, b2.height)
    ours = b2(PROMPTS, image=image, mask_image=mask, strength=0.6, steps=4, scheduler="euler_a", seed=SEEDS).pixels
    want = oracle("inpaint", "euler_a", SEEDS, prompt=PROMPTS, image=image, mask_image=mask, strength=0.6,
                  num_inference_steps=4, height=b2.height, width=b2.width)
    diff = _max_diff(ours, want)
    print(f"inpaint euler_a max diff {diff:.3g}")
    assert diff <= TOL


def test_each_item_equals_a_batch_of_one_with_its_seed(b1, b2):
    image = _photo(b2.width, b2.height)
    for kw in (dict(steps=4, scheduler="euler_a"), dict(image=image, strength=0.7, steps=4, scheduler="ddpm")):
        batch = b2(PROMPTS, negative_prompt=NEGATIVE, seed=SEEDS, **kw).pixels
        for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
            alone = b1(prompt, negative_prompt=NEGATIVE, seed=seed, **kw).pixels
            diff = _max_diff(batch[i:i + 1], alone)
            print(f"{'img2img' if 'image' in kw else 'txt2img'} item {i} vs batch of one: max diff {diff:.3g}")
            assert diff <= SAME_TOL, (kw.get("scheduler"), i)


def test_numpy_generator_with_a_seed_per_item_gives_each_item_its_batch_of_one_image(b1, b2):
    batch = b2(PROMPTS, steps=3, scheduler="euler_a", seed=SEEDS, generator="numpy").pixels
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS)):
        alone = b1(prompt, steps=3, scheduler="euler_a", seed=seed, generator="numpy").pixels
        assert _max_diff(batch[i:i + 1], alone) <= SAME_TOL


def test_a_single_seed_still_draws_the_whole_batch_from_one_generator_as_diffusers(b2, oracle):
    result = b2(PROMPTS, steps=3, scheduler="euler_a", seed=SEEDS[1])
    want = oracle("txt2img", "euler_a", SEEDS[1], prompt=PROMPTS, num_inference_steps=3, height=b2.height,
                  width=b2.width)
    assert _max_diff(result.pixels, want) <= TOL
    assert result.config.seeds is None and result.seeds == (SEEDS[1],) * 2
    assert [_seed_in(im.info["parameters"]) for im in result.images] == [SEEDS[1]] * 2
    # [s, s] is not s: each item then starts from the same noise.
    same = b2(PROMPTS, steps=3, scheduler="euler_a", seed=[SEEDS[1]] * 2).pixels
    assert _max_diff(same, result.pixels) > 1e-3


@pytest.mark.parametrize("seed, error, words", [
    ([1, 2, 3], InvalidInput, "seed has 3 items but this artifact generates 2 image(s) per call: pass one seed or "
                              "a list of 2"),
    ([5], InvalidInput, "seed has 1 items but this artifact generates 2"),
    ([], InvalidInput, "seed has 0 items"),
    ([1, "2"], InvalidType, "seed[1] must be an integer from 0 to 2**64-1, got str '2' (a list of 2 seeds"),
    ([True, 2], InvalidType, "seed[0] must be an integer from 0 to 2**64-1, got bool True"),
    ([1, None], InvalidType, "seed[1] must be an integer from 0 to 2**64-1, got NoneType None"),
    ([1, 2.0], InvalidType, "seed[1] must be an integer from 0 to 2**64-1, got float 2.0"),
    ([-1, 2], InvalidInput, "seed[0] must be from 0 to 2**64-1 (18446744073709551615), got -1 (a list of 2 seeds"),
    ([1, 2**64], InvalidInput, f"seed[1] must be from 0 to 2**64-1 (18446744073709551615), got {2**64}"),
])
def test_a_bad_seed_list_is_refused_naming_the_entry_and_the_batch(b2, seed, error, words):
    with pytest.raises(error) as e:
        b2(PROMPTS, steps=2, seed=seed)
    assert words in str(e.value)
    with pytest.raises(error, match=re.escape(words)):
        GenerationConfig.create("x", None, 2, 7.5, "euler", seed, batch=2)


def test_seed_list_edges_are_accepted():
    config = GenerationConfig.create("x", None, 2, 7.5, "euler", (0, np.uint64(2**64 - 1)), batch=2)
    assert config.seeds == (0, 2**64 - 1) and type(config.seeds[1]) is int and config.item_seeds == config.seeds
    one = GenerationConfig.create("x", None, 2, 7.5, "euler", [9], batch=1)
    assert one.seed == 9 and one.seeds == (9,)


def test_generate_cli_takes_comma_separated_seeds_and_writes_each_items_seed(b2, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["generate", str(b2.folder), "--prompt", PROMPTS[0], "--steps", "2", "--scheduler", "euler_a",
                 "--seed", f"{SEEDS[0]},{SEEDS[1]}", "--out", str(out)]) == 0
    assert f"seed {SEEDS[0]}, {SEEDS[1]}" in capsys.readouterr().out
    second = tmp_path / "fox-1.png"
    assert [_seed_in(read_parameters(p)) for p in (out, second)] == SEEDS
    api = b2(PROMPTS[0], steps=2, scheduler="euler_a", seed=SEEDS)
    for path, image in zip((out, second), api.images):
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.asarray(im), np.asarray(image))
    assert main(["generate", str(b2.folder), "--prompt", "x", "--seed", "1,x", "--out", str(tmp_path / "a.png")]) == 2
    assert "--seed: invalid int value: 'x' in '1,x'" in capsys.readouterr().err
    assert main(["generate", str(b2.folder), "--prompt", "x", "--seed", "1,2,3", "--out", str(tmp_path / "b.png")]) == 2
    assert "seed has 3 items but this artifact generates 2 image(s)" in capsys.readouterr().err


def test_the_png_seed_of_each_item_reads_back(b2):
    from sdrt.runtime.infotext import settings
    result = b2(PROMPTS, steps=1, scheduler="euler", seed=SEEDS)
    assert [settings(im.info["parameters"]).kwargs["seed"] for im in result.images] == SEEDS
    assert json.dumps(list(result.seeds)) == json.dumps(SEEDS)
