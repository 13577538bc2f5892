"""Textual inversion: embedding files in a prompt give diffusers' pixels after its
`load_textual_inversion` (the oracle), same weights, latents and scheduler.

What the oracle does that sdrt must follow (diffusers' loaders/textual_inversion.py):
- each vector of an embedding is a new token, `<tok>`, `<tok>_1`, ..., with ids after the
  vocabulary in the order loaded; `maybe_convert_prompt` writes them all where the
  trigger stands, so a k-vector embedding takes k token positions;
- the trigger is an added token of the tokenizer: found in the normalised (lowercased)
  text, even inside a word; negative prompts are read the same way;
- a token already in the vocabulary is refused.
AUTOMATIC1111's files are loaded into diffusers with token=<the file's name>, the
trigger the web UI gives them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdrt.engines.errors import InvalidInput
from sdrt.engines.specs import ShapeConfig
from sdrt.export.tiny import make_tiny_embedding
from sdrt.runtime import Pipeline
from sdrt.runtime import embeddings as emb
from sdrt.runtime.artifact import Artifact
from sdrt.runtime.prompts import chunk_prompts, tokenize_chunks
from sdrt.runtime.schedulers import diffusers_scheduler

TOL = 1e-4   # max abs on pixels in [0, 1] (the bar)
STEPS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Embeddings for the tiny SD 1.5 model: name -> path."""
    d = tmp_path_factory.mktemp("embeddings")
    return {
        "a1111-1": make_tiny_embedding(d / "tiny-one.safetensors", vectors=1, seed=1),
        "a1111-3": make_tiny_embedding(d / "tiny-three.safetensors", vectors=3, seed=2),
        "diffusers-1": make_tiny_embedding(d / "learned_embeds.safetensors", vectors=1, format="diffusers",
                                           token="<cat-toy>", seed=3),
        "diffusers-2": make_tiny_embedding(d / "fox.safetensors", vectors=2, format="diffusers", token="<fox-x>",
                                           seed=4),
    }


TRIGGERS = {"a1111-1": "tiny-one", "a1111-3": "tiny-three", "diffusers-1": "<cat-toy>", "diffusers-2": "<fox-x>"}


class Oracle:
    """diffusers' StableDiffusionPipeline of the tiny model; embeddings are loaded per
    call and unloaded after it."""

    def __init__(self, model_dir):
        import diffusers
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                                      requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        cls_name, overrides = diffusers_scheduler("euler", self.pipe.scheduler.config)
        self.pipe.scheduler = getattr(diffusers, cls_name).from_config(self.pipe.scheduler.config, **overrides)

    def load(self, names, files):
        for name in names:
            path = str(files[name])
            # A1111's files: diffusers would name them by their tensor ("emb_params").
            self.pipe.load_textual_inversion(path, token=TRIGGERS[name] if name.startswith("a1111") else None)

    def __call__(self, names, files, prompt, negative_prompt, latents):
        import torch
        self.load(names, files)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # see test_pipeline.Diffusers
        try:
            with torch.no_grad():
                return self.pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=STEPS,
                                 guidance_scale=7.5, latents=torch.from_numpy(latents.copy()),
                                 output_type="np").images
        finally:
            torch.set_num_threads(threads)
            self.pipe.unload_textual_inversion()


@pytest.fixture(scope="module")
def oracle(tiny_sd15):
    return Oracle(tiny_sd15)


@pytest.fixture(scope="module")
def pipe(sd15_artifacts):
    return Pipeline.load(sd15_artifacts)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


CASES = {
    "a1111-single": (["a1111-1"], "a tiny-one fox in the snow", "blurry"),
    "a1111-multi": (["a1111-3"], "a tiny-three fox in the snow", "blurry"),
    "diffusers-single": (["diffusers-1"], "a <cat-toy> on a table", None),
    "diffusers-multi": (["diffusers-2"], "a <fox-x> in the snow", "blurry"),
    "negative-prompt": (["a1111-3"], "a fox in the snow", "tiny-three, blurry"),
    "two-at-once": (["a1111-3", "diffusers-2"], "tiny-three and a <fox-x>, tiny-three", "<fox-x> blurry"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_embedding_matches_diffusers_load_textual_inversion(case, pipe, oracle, files):
    names, prompt, negative = CASES[case]
    latents = np.random.default_rng(7).standard_normal(pipe.latent_shape, dtype=np.float32)
    ours = pipe(prompt, negative_prompt=negative, steps=STEPS, scheduler="euler", latents=latents,
                embeddings=[files[n] for n in names]).pixels
    want = oracle(names, files, prompt, negative, latents)
    assert _max_diff(ours, want) <= TOL
    # The embedding is used: without it the trigger is plain text and the image differs.
    plain = pipe(prompt, negative_prompt=negative, steps=STEPS, scheduler="euler", latents=latents).pixels
    assert _max_diff(ours, plain) > 1e-3


def test_prompt_ids_are_diffusers_ids_after_maybe_convert_prompt(oracle, files, sd15_artifacts):
    """The token ids each prompt gives, against diffusers' tokenizer with the embeddings
    added and the prompt converted: triggers inside words, next to punctuation, twice,
    across whitespace runs, in upper case (single-vector: diffusers' multi-vector
    expansion is case-sensitive, its matching is not), one trigger the prefix of another
    text. (diffusers' names of the further vectors, `<tok>_1` ..., are no triggers here.)"""
    names = ["a1111-1", "a1111-3", "diffusers-1", "diffusers-2"]
    art = Artifact.open(sd15_artifacts)
    fitted = art.embeddings([files[n] for n in names])
    triggers = fitted.triggers[next(iter(fitted.triggers))]
    oracle.load(names, files)
    try:
        tok = oracle.pipe.tokenizer
        for prompt in ["a tiny-three fox", "xtiny-onex and tiny-one,tiny-one", "a   <cat-toy>!!<cat-toy>",
                       "TINY-ONE <CAT-TOY>", "tiny-threes <fox-x><fox-x> tiny-thre", "tiny-one_1",
                       "no trigger here"]:
            text = oracle.pipe.maybe_convert_prompt(prompt, tok)
            want = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            got = chunk_prompts(art.tokenizer, [prompt], weighting=False, max_chunks=1, triggers=triggers).ids[0, 0]
            assert got.tolist() == want, prompt
    finally:
        oracle.pipe.unload_textual_inversion()


def test_an_embedding_is_not_split_across_chunks(sd15_artifacts, files):
    """AUTOMATIC1111's rule (sd_hijack_clip.py tokenize_line): an embedding that does not
    fit in the rest of a 75-token chunk starts the next one."""
    art = Artifact.open(sd15_artifacts)
    triggers = next(iter(art.embeddings([files["a1111-3"]]).triggers.values()))
    filler = " ".join(["fox"] * 74)
    chunks = tokenize_chunks(art.tokenizer, f"{filler} tiny-three", weighting=False, triggers=triggers)
    assert [c.length for c in chunks] == [74, 3]
    base = art.manifest.facts.text_vocab_size
    assert chunks[1].ids[1:4].tolist() == [base, base + 1, base + 2]


def test_weighted_trigger_gives_every_vector_its_weight(sd15_artifacts, files):
    art = Artifact.open(sd15_artifacts)
    triggers = next(iter(art.embeddings([files["a1111-3"]]).triggers.values()))
    (chunk,) = tokenize_chunks(art.tokenizer, "a (tiny-three:1.3) fox", triggers=triggers)
    assert chunk.weights[:6].tolist() == pytest.approx([1.0, 1.0, 1.3, 1.3, 1.3, 1.0])


def test_calls_without_embeddings_are_bit_identical_to_an_artifact_without_slots(tiny_sd15, export_into, pipe,
                                                                                  files, tmp_path_factory):
    """The token_embeddings path (two Gathers and a Where) changes nothing when no
    embedding is used; an artifact without slots refuses embeddings, naming the flag."""
    folder = export_into(tiny_sd15, tmp_path_factory.mktemp("artifacts") / "no-slots", embedding_slots=0,
                         vae_encoder=False, verify=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["shape"]["embedding_slots"] == 0
    old = Pipeline.load(folder)
    assert "token_embeddings" not in {i.name for i in old.manifest.specs[next(iter(old.manifest.stages))].inputs}
    for prompt in ("a watercolor fox, highly detailed", "tiny-three (fox:1.2)"):
        a = old(prompt, negative_prompt="blurry", steps=2, seed=5).pixels
        b = pipe(prompt, negative_prompt="blurry", steps=2, seed=5).pixels
        assert np.array_equal(a, b)
    with pytest.raises(InvalidInput, match="--embedding-slots"):
        old("tiny-three", embeddings=[files["a1111-3"]])


def test_manifests_without_embedding_slots_read_as_none():
    shape = ShapeConfig.from_json({"height": 64, "width": 64, "batch": 1, "cfg": True})
    assert shape.embedding_slots == 0


# -- hostile and unfit files ----------------------------------------------------------------


def _write(path, tensors):
    from safetensors.numpy import save_file
    save_file(tensors, str(path))
    return path


def _refusal(art, embeddings, **kw):
    with pytest.raises(InvalidInput) as e:
        art.request("a fox", embeddings=embeddings, **kw)
    text = str(e.value)
    assert "\n" not in text
    return text


def test_unfit_and_hostile_embeddings_are_refused_in_one_line(sd15_artifacts, files, tmp_path):
    import torch
    art = Artifact.open(sd15_artifacts)
    width = art.manifest.facts.text_hidden_size
    cases = {
        # (file, words the message must hold)
        "wide": (_write(tmp_path / "wide.safetensors", {"emb_params": np.zeros((2, 768), np.float32)}),
                 ["768 wide", f"takes {width}", "another model"]),
        "nan": (_write(tmp_path / "nan.safetensors", {"emb_params": np.full((1, width), np.nan, np.float32)}),
                ["NaN"]),
        "no-vectors": (_write(tmp_path / "none.safetensors", {"emb_params": np.zeros((0, width), np.float32)}),
                       ["shape [0, 32]"]),
        "empty-file": (tmp_path / "empty.safetensors", ["too short"]),
        "truncated": (tmp_path / "cut.safetensors", ["truncated"]),
        "ints": (_write(tmp_path / "ints.safetensors", {"emb_params": np.zeros((1, width), np.int32)}),
                 ["not a float"]),
        "many-tensors": (_write(tmp_path / "lora.safetensors", {"a": np.zeros((1, width), np.float32),
                                                                  "b": np.zeros((1, width), np.float32)}),
                         ["not a textual-inversion embedding"]),
        "sdxl-pair": (make_tiny_embedding(tmp_path / "xl.safetensors", variant="sdxl"), ["SDXL embedding"]),
        "pickle": (tmp_path / "old.pt", ["pickle", "--allow-pickle-code-execution"]),
        "vocabulary-word": (_write(tmp_path / "cat.safetensors", {"emb_params": np.zeros((1, width), np.float32)}),
                            ["'cat'", "vocabulary", "FILE:TOKEN"]),
    }
    (tmp_path / "empty.safetensors").write_bytes(b"")
    full = files["a1111-3"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(full[:len(full) - 10])
    torch.save({"string_to_param": {"*": torch.zeros(1, width)}, "name": "old"}, tmp_path / "old.pt")
    for name, (path, words) in cases.items():
        text = _refusal(art, [path])
        assert str(path) in text, name
        for w in words:
            assert w in text, (name, text)
    # an explicit token lifts the vocabulary clash
    assert art.request("a fox", embeddings=[(cases["vocabulary-word"][0], "<cat>")]).embeddings is not None
    # two embeddings with one trigger; more vectors than the artifact has slots
    assert "distinct token" in _refusal(art, [files["a1111-3"], (files["a1111-1"], "tiny-three")])
    slots = art.manifest.shape.embedding_slots
    big = _write(tmp_path / "huge-embq.safetensors", {"emb_params": np.zeros((slots // 2 + 1, width), np.float32)})
    assert "--embedding-slots" in _refusal(art, [big, (big, "huge-embq-two")])


def test_pickled_embedding_with_the_flag_reads_as_its_safetensors_twin(files, tmp_path):
    """AUTOMATIC1111's .pt (string_to_param) is read with allow_pickle, named by its file."""
    import torch
    twin = emb.load(files["a1111-3"])
    path = tmp_path / "tiny-three.pt"
    torch.save({"string_to_param": {"*": torch.from_numpy(twin.vectors[emb.SINGLE])}, "name": "other"}, path)
    got = emb.load(path, allow_pickle=True)
    assert got.trigger == "tiny-three"
    assert np.array_equal(got.vectors[emb.SINGLE], twin.vectors[emb.SINGLE])


def test_generate_cli_takes_embeddings(sd15_artifacts, pipe, files, tmp_path, capsys):
    from PIL import Image

    from sdrt.cli.main import main
    out = tmp_path / "o.png"
    assert main(["generate", str(sd15_artifacts), "--prompt", "a <fox> in snow", "--steps", "2", "--seed", "9",
                 "--embedding", str(files["a1111-3"]), "--embedding", f"{files['diffusers-2']}:<fox>",
                 "--out", str(out)]) == 0
    want = pipe("a <fox> in snow", steps=2, seed=9, embeddings=[files["a1111-3"], (files["diffusers-2"], "<fox>")])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want.images[0]))
    capsys.readouterr()
    assert main(["generate", str(sd15_artifacts), "--prompt", "x", "--embedding", str(tmp_path / "nope.safetensors"),
                 "--out", str(tmp_path / "p.png")]) == 2
    assert "nope.safetensors does not exist" in capsys.readouterr().err


def test_tiny_model_cli_writes_embeddings_in_both_formats(tmp_path, capsys):
    from sdrt.cli.main import main
    a1111, diff = tmp_path / "my-style.safetensors", tmp_path / "d.safetensors"
    assert main(["tiny-model", str(a1111), "--embedding", "a1111", "--vectors", "3"]) == 0
    assert main(["tiny-model", str(diff), "--embedding", "diffusers", "--token", "<d>"]) == 0
    a, d = emb.load(a1111), emb.load(diff)
    assert (a.trigger, a.vectors[emb.SINGLE].shape) == ("my-style", (3, 32))
    assert (d.trigger, d.vectors[emb.SINGLE].shape) == ("<d>", (2, 32))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, export_into):
    """(base model, refiner model, base Pipeline, refiner Pipeline, embedding file): the
    slow SDXL tests' tiny SDXL pair and a 2-vector clip_l + clip_g embedding."""
    from sdrt.export.tiny import make_tiny_model
    root, out = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("artifacts")
    base = make_tiny_model(root / "sdxl", variant="sdxl")
    refiner = make_tiny_model(root / "refiner", variant="sdxl-refiner")
    path = make_tiny_embedding(tmp_path_factory.mktemp("embeddings") / "xl-style.safetensors", variant="sdxl",
                               vectors=2, seed=5)
    return (base, refiner, Pipeline.load(export_into(base, out / "base", vae_encoder=False)),
            Pipeline.load(export_into(refiner, out / "refiner")), path)


def _load_sdxl_embedding(pipe, path, encoders):
    """diffusers' documented SDXL recipe: one load_textual_inversion per text encoder
    and tokenizer, clip_l's vectors to the first, clip_g's to the second, the token given."""
    from safetensors.torch import load_file
    state = load_file(str(path))
    for key, (encoder, tokenizer) in encoders.items():
        pipe.load_textual_inversion(state[key], token="xl-style", text_encoder=encoder, tokenizer=tokenizer)


@pytest.mark.slow
def test_sdxl_embedding_matches_diffusers_with_clip_l_and_clip_g(sdxl):
    import diffusers
    import torch
    model, _, pipe, _, path = sdxl
    oracle = diffusers.StableDiffusionXLPipeline.from_pretrained(model, add_watermarker=False)
    oracle.set_progress_bar_config(disable=True)
    _load_sdxl_embedding(oracle, path, {"clip_l": (oracle.text_encoder, oracle.tokenizer),
                                        "clip_g": (oracle.text_encoder_2, oracle.tokenizer_2)})
    for prompt, negative in (("a xl-style fox", "blurry"), ("a fox", "xl-style")):
        ours = pipe(prompt, negative_prompt=negative, steps=STEPS, guidance=5.0, seed=3, embeddings=[path]).pixels
        with torch.no_grad():
            want = oracle(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=5.0,
                          generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                          height=pipe.height, width=pipe.width).images
        assert _max_diff(ours, want) <= TOL
        plain = pipe(prompt, negative_prompt=negative, steps=STEPS, guidance=5.0, seed=3).pixels
        assert _max_diff(ours, plain) > 1e-3


@pytest.mark.slow
def test_sdxl_refiner_hand_off_reads_the_embedding_with_its_one_encoder(sdxl):
    """The refiner has text_encoder_2 alone: it takes clip_g's vectors."""
    import diffusers
    import torch
    base_model, refiner_model, base, refiner, path = sdxl
    first = diffusers.StableDiffusionXLPipeline.from_pretrained(base_model, add_watermarker=False)
    second = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_model)
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    _load_sdxl_embedding(first, path, {"clip_l": (first.text_encoder, first.tokenizer),
                                       "clip_g": (first.text_encoder_2, first.tokenizer_2)})
    _load_sdxl_embedding(second, path, {"clip_g": (second.text_encoder_2, second.tokenizer_2)})
    kw = dict(prompt="a xl-style fox", negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=4)
    g = torch.Generator("cpu").manual_seed(7)
    with torch.no_grad():
        latents = first(denoising_end=0.75, output_type="latent", generator=g, **kw).images
        want = second(image=latents, denoising_start=0.75, output_type="np", generator=g, **kw).images
    got = base.refine(refiner, "a xl-style fox", high_noise_frac=0.75, negative_prompt="blurry", steps=4,
                      guidance=5.0, seed=7, embeddings=[path])
    assert _max_diff(got.pixels, want) <= TOL
    assert "TI hashes" in got.parameters


def test_png_records_the_embeddings_used_as_automatic1111_does(pipe, files):
    """"TI hashes: name: first 12 digits of the file's SHA-256", the used ones only; a
    regeneration from the PNG says the embeddings must be passed again."""
    import hashlib

    from sdrt.runtime.infotext import parse, settings
    result = pipe("a tiny-three fox", negative_prompt="<fox-x>", steps=1, seed=1,
                  embeddings=[files["a1111-3"], files["diffusers-2"], files["a1111-1"]])
    digest = {n: hashlib.sha256(files[n].read_bytes()).hexdigest()[:12] for n in files}
    assert parse(result.parameters).fields["TI hashes"] == (f"tiny-three: {digest['a1111-3']}, "
                                                         f"<fox-x>: {digest['diffusers-2']}")
    assert any("--embedding" in n for n in settings(result.parameters).notes)
    assert "TI hashes" not in pipe("a tiny-three fox", steps=1, seed=1).parameters


def test_legacy_clip_pooling_takes_the_embedding_position_as_diffusers_does(tmp_path):
    """A CLIP config of eos_token_id 2 (SDXL's published text_encoder_2) pools at the
    largest token id. After diffusers' load_textual_inversion that is an embedding's
    id (they follow the vocabulary), so its pooled `text_embeds` come from the
    embedding's position; the exported graph, fed the same ids, does the same."""
    import copy

    import onnxruntime as ort
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdrt.engines.specs import ModelFacts, Stage, text_encoder_2_spec
    from sdrt.export import graphs
    from sdrt.export.tiny import _variant

    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**_variant("sdxl").text_2, eos_token_id=2)).eval()
    vocab, width = model.config.vocab_size, model.config.hidden_size
    facts = ModelFacts(latent_channels=4, vae_scale_factor=8, vae_scaling_factor=0.13025, image_channels=3,
                       text_max_length=77, text_hidden_size=32, unet_sample_size=16, unet_size_multiple=4,
                       prediction_type="epsilon", family="sdxl", text_num_layers=3, text_2_hidden_size=width,
                       pooled_size=model.config.projection_dim, text_2_num_layers=4, text_vocab_size=vocab)
    spec = text_encoder_2_spec(facts, ShapeConfig(128, 128, embedding_slots=4))
    vectors = (0.02 * torch.randn(2, width)).float()
    ids = np.full((2, 77), 0, np.int32)   # "!" padding, as tokenizer_2's
    ids[:, :6] = [49406, 320, vocab, vocab + 1, 343, 49407]
    ids[0, 2:4] = [1929, 1930]            # the unconditional row: no embedding
    slots = np.zeros((4, width), np.float32)
    slots[:2] = vectors.numpy()
    inputs = {"input_ids": ids, "clip_skip": np.zeros(2, np.int32), "token_embeddings": slots}

    oracle = copy.deepcopy(model)    # load_textual_inversion's steps 7.3-7.4
    oracle.resize_token_embeddings(vocab + 2)
    oracle.get_input_embeddings().weight.data[vocab:] = vectors
    with torch.no_grad():
        out = oracle(torch.from_numpy(ids).long())
        want = out.text_embeds.numpy()
        at_eos = oracle.text_projection(out.last_hidden_state[1, 5]).numpy()
    assert np.abs(want[1] - at_eos).max() > 1e-3   # where it pools matters
    graph = graphs.wrap(Stage.TEXT_ENCODER_2, model, spec, facts)
    graphs.export_raw(graph, spec, inputs, tmp_path / "te2.onnx")
    session = ort.InferenceSession(str(tmp_path / "te2.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))["text_embeds"]
    assert np.abs(got - want).max() <= 1e-5
    assert ids[1].argmax() == 3 and ids[0].argmax() == 5   # pooled at the last vector, and at EOS
