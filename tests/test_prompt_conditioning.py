"""Prompts past 77 tokens, AUTOMATIC1111 weighting, BREAK and clip skip, end to end,
against diffusers and transformers.

The oracle builds the conditioning independently: transformers' CLIPTokenizer and
CLIPTextModel, the web UI's chunking rule (75 tokens, a break after a comma within 20
tokens of the end) written out here, the web UI's emphasis (scale, then restore the
chunk's mean) in torch, then diffusers' StableDiffusionPipeline fed
`prompt_embeds`/`negative_prompt_embeds` with the same seed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from sdrt.engines.errors import InvalidInput
from sdrt.runtime import Pipeline
from sdrt.runtime.config import GenerationConfig
from sdrt.runtime.tokenizer import PromptTruncated

TOL = 1e-4          # pixels in [0, 1]: the bound
EMBED_TOL = 1e-5    # text embeddings: the bound for weighted prompts
STEPS = 3
FOX = "a red fox in a snowy forest at dawn"


class Oracle:
    """transformers' CLIP and diffusers' pipeline of one checkpoint folder."""

    def __init__(self, model_dir):
        import diffusers
        import torch
        from transformers import CLIPTokenizer
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            model_dir, safety_checker=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        self.encoder = self.pipe.text_encoder
        # diffusers 0.42's clip_skip reads `text_encoder.text_model.final_layer_norm`,
        # a level transformers 5 removed; give it that path (outside torch's module
        # registry, so no module cycle) to run diffusers' own clip_skip code.
        if not hasattr(self.encoder, "text_model"):
            object.__setattr__(self.encoder, "text_model", self.encoder)
        self.torch = torch

    def tokens(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chunks(self, runs):
        """The web UI's `tokenize_line`: runs of (text, weight) -> chunks of (ids, weights)."""
        tok = self.tokenizer
        comma = tok.convert_tokens_to_ids(",</w>")
        out, ids, weights, last_comma = [], [], [], -1

        def close():
            nonlocal ids, weights, last_comma
            pad = tok.pad_token_id
            out.append(([tok.bos_token_id] + ids + [tok.eos_token_id] + [pad] * (75 - len(ids)),
                        [1.0] + weights + [1.0] * (76 - len(weights))))
            ids, weights, last_comma = [], [], -1

        for text, weight in runs:
            if text == "BREAK" and weight == -1:
                close()
                continue
            for t in self.tokens(text):
                if t == comma:
                    last_comma = len(ids)
                elif len(ids) == 75 and last_comma != -1 and len(ids) - last_comma <= 20:
                    keep = last_comma + 1
                    moved = ids[keep:], weights[keep:]
                    ids, weights = ids[:keep], weights[:keep]
                    close()
                    ids, weights = list(moved[0]), list(moved[1])
                if len(ids) == 75:
                    close()
                ids.append(t)
                weights.append(weight)
        if ids or not out:
            close()
        return out

    def embed(self, chunks, count, clip_skip=None):
        """(1, 77 * count, width): each chunk encoded, emphasis applied, empty chunks after."""
        torch = self.torch
        chunks = list(chunks) + self.chunks([("", 1.0)]) * (count - len(chunks))
        zs = []
        with torch.no_grad():
            for ids, weights in chunks:
                out = self.encoder(torch.tensor([ids]), output_hidden_states=True)
                z = out[0] if clip_skip is None else self.encoder.text_model.final_layer_norm(
                    out.hidden_states[-(clip_skip + 1)])
                w = torch.tensor(weights, dtype=torch.float32).reshape(1, -1, 1)
                if (w != 1).any():   # sd_emphasis.py EmphasisOriginal
                    mean = z.mean()
                    z = z * w
                    z = z * (mean / z.mean())
                zs.append(z)
        return torch.cat(zs, dim=1)

    def generate(self, seed, prompt_embeds, negative_prompt_embeds, guidance=7.5, **kw):
        torch = self.torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return self.pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                 num_inference_steps=STEPS, guidance_scale=guidance, output_type="np",
                                 generator=torch.Generator("cpu").manual_seed(seed), **kw).images
        finally:
            torch.set_num_threads(threads)

    def generate_text(self, seed, prompt, negative_prompt=None, **kw):
        torch = self.torch
        with torch.no_grad():
            return self.pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=STEPS, output_type="np",
                             generator=torch.Generator("cpu").manual_seed(seed), **kw).images


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def model(tiny_sd15, tmp_path_factory):
    """The tiny SD 1.5 model with a trained-looking final layer norm. Its random init
    (weight 1, bias 0) gives every token vector mean 0, where the emphasis rule's
    mean restore divides 0 by 0; a real CLIP's learned bias keeps the mean away from 0."""
    import shutil

    import torch
    from transformers import CLIPTextModel
    folder = tmp_path_factory.mktemp("models") / "sd15-ln"
    shutil.copytree(tiny_sd15, folder)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.3 + 0.3 * torch.randn(norm.bias.shape, generator=g))
    encoder.save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def oracle(model):
    return Oracle(model)


@pytest.fixture(scope="module")
def k1(model, tmp_path_factory, export_into):
    return Pipeline.load(export_into(model, tmp_path_factory.mktemp("artifacts") / "sd15-k1"))


@pytest.fixture(scope="module")
def k3(model, tmp_path_factory, export_into):
    return Pipeline.load(export_into(model, tmp_path_factory.mktemp("artifacts") / "sd15-k3", prompt_chunks=3))


def _words(n, start=0):
    """n distinct one-token words (no commas): a prompt of exactly n tokens."""
    vocab = ["fox", "tree", "snow", "river", "house", "cloud", "stone", "bird", "grass", "moon", "lake", "hill"]
    return " ".join(vocab[(start + i) % len(vocab)] for i in range(n))


# -- long prompts ------------------------------------------------------------------------

LONG = [
    # (prompt, negative): 2 and 3 chunks, unequal lengths both ways, a comma break
    (_words(120), "blurry"),
    (_words(60), _words(100, 3)),
    (", ".join([FOX] * 20), _words(80, 5)),          # 3 chunks, broken at commas
    (_words(200) + ", " + _words(10), None),
]


@pytest.mark.parametrize("prompt,negative", LONG)
def test_long_prompt_matches_diffusers_fed_the_chunked_embeddings(oracle, k3, prompt, negative):
    pos = oracle.chunks([(prompt, 1.0)])
    neg = oracle.chunks([(negative or "", 1.0)])
    count = max(len(pos), len(neg))
    assert count in (2, 3)
    expected = oracle.generate(11, oracle.embed(pos, count), oracle.embed(neg, count))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncated)
        got = k3(prompt, negative_prompt=negative, steps=STEPS, seed=11)
    assert _max_diff(got.pixels, expected) <= TOL


@pytest.mark.parametrize("prompt", ["a fox", FOX + ", " + _words(40), "(a fox:1.3) [in snow]", ""])
def test_short_prompt_gives_the_same_pixels_on_k3_as_on_k1(k1, k3, prompt):
    a = k1(prompt, negative_prompt="blurry, dark", steps=STEPS, seed=5)
    b = k3(prompt, negative_prompt="blurry, dark", steps=STEPS, seed=5)
    assert _max_diff(a.pixels, b.pixels) <= TOL


def test_short_prompt_on_k1_is_diffusers_own_encoding(oracle, k1):
    """No syntax, under 75 tokens: exactly today's embeddings, so diffusers' own
    prompt encoding is the oracle."""
    expected = oracle.generate_text(3, FOX, negative_prompt="blurry")
    got = k1(FOX, negative_prompt="blurry", steps=STEPS, seed=3)
    assert _max_diff(got.pixels, expected) <= TOL


def test_prompt_past_k_chunks_is_cut_with_one_warning_naming_tokens_and_k(oracle, k3):
    prompt = _words(260)
    with pytest.warns(PromptTruncated) as caught:
        got = k3(prompt, steps=STEPS, seed=2)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "260 tokens" in message and "35 were dropped" in message and "at most 3 chunk(s)" in message
    pos = oracle.chunks([(prompt, 1.0)])[:3]
    expected = oracle.generate(2, oracle.embed(pos, 3), oracle.embed(oracle.chunks([("", 1.0)]), 3))
    assert _max_diff(got.pixels, expected) <= TOL


def test_k1_keeps_the_first_75_tokens_as_diffusers_truncates(oracle, k1):
    """The last chunk kept is filled to 75 tokens, not broken at a comma: on a K=1
    artifact a long prompt gives diffusers' own (truncated) image, as before."""
    prompt = ", ".join([FOX] * 12)
    expected = oracle.generate_text(4, prompt)
    with pytest.warns(PromptTruncated, match=r"at most 1 chunk"):
        got = k1(prompt, steps=STEPS, seed=4)
    assert _max_diff(got.pixels, expected) <= TOL


# -- weighting -----------------------------------------------------------------------------

# Prompts with their runs written out by hand from the web UI's rules.
WEIGHTED = [
    ("a (red:1.5) fox [in snow]", [("a ", 1.0), ("red", 1.5), (" fox ", 1.0), ("in snow", 1 / 1.1)]),
    ("((castle)) at night", [("castle", 1.1 * 1.1), (" at night", 1.0)]),
    ("a \\(literal\\) fox, (hill:0.5)", [("a (literal) fox, ", 1.0), ("hill", 0.5)]),
]


@pytest.mark.parametrize("prompt,runs", WEIGHTED)
def test_weighted_prompt_embeddings_follow_the_emphasis_rule(oracle, k1, prompt, runs):
    config = GenerationConfig.create(prompt, "blurry", STEPS, 7.5, "euler", 0, batch=1)
    cond, _ = k1.encode_prompt(config)
    expected = np.concatenate([oracle.embed(oracle.chunks([("blurry", 1.0)]), 1).numpy(),
                               oracle.embed(oracle.chunks(runs), 1).numpy()])
    assert _max_diff(cond.hidden_states, expected) <= EMBED_TOL
    assert cond.attention_mask is None


def test_weighted_long_prompt_matches_diffusers(oracle, k3):
    prompt = "(" + _words(90) + ":1.2), [" + _words(30, 2) + "]"
    runs = [(_words(90), 1.2), (", ", 1.0), (_words(30, 2), 1 / 1.1)]
    pos = oracle.chunks(runs)
    assert len(pos) == 2
    expected = oracle.generate(8, oracle.embed(pos, 2), oracle.embed(oracle.chunks([("", 1.0)]), 2))
    got = k3(prompt, steps=STEPS, seed=8)
    assert _max_diff(got.pixels, expected) <= TOL


def test_break_starts_a_new_chunk_as_the_web_ui(oracle, k3):
    expected = oracle.generate(6, oracle.embed(oracle.chunks([("a fox", 1.0), ("BREAK", -1), ("a tree", 1.0)]), 2),
                               oracle.embed(oracle.chunks([("", 1.0)]), 2))
    got = k3("a fox BREAK a tree", steps=STEPS, seed=6)
    assert _max_diff(got.pixels, expected) <= TOL


def test_no_weighting_keeps_the_text_literal(oracle, k1):
    prompt = "a (fox:1.5) BREAK [snow]"
    expected = oracle.generate_text(9, prompt)   # diffusers reads no syntax
    got = k1(prompt, steps=STEPS, seed=9, prompt_weighting=False)
    assert _max_diff(got.pixels, expected) <= TOL
    weighted = k1(prompt, steps=STEPS, seed=9)
    assert _max_diff(weighted.pixels, expected) > 1e-3   # the syntax does change the image


def test_prompt_weighting_must_be_a_bool(k1):
    with pytest.raises(Exception, match="prompt_weighting must be True or False"):
        k1("a fox", steps=1, seed=0, prompt_weighting="no")


# -- clip skip -------------------------------------------------------------------------------

@pytest.mark.parametrize("clip_skip", [0, 1])
def test_clip_skip_matches_diffusers(oracle, k1, clip_skip):
    expected = oracle.generate_text(12, FOX, negative_prompt="blurry", clip_skip=clip_skip)
    got = k1(FOX, negative_prompt="blurry", steps=STEPS, seed=12, clip_skip=clip_skip)
    assert _max_diff(got.pixels, expected) <= TOL


def test_clip_skip_with_a_long_prompt_on_k3(oracle, k3):
    prompt = _words(100)
    pos, neg = oracle.chunks([(prompt, 1.0)]), oracle.chunks([("", 1.0)])
    # diffusers skips layers for the prompt only; the negative prompt keeps the last layer.
    expected = oracle.generate(13, oracle.embed(pos, 2, clip_skip=1), oracle.embed(neg, 2))
    got = k3(prompt, steps=STEPS, seed=13, clip_skip=1)
    assert _max_diff(got.pixels, expected) <= TOL


def test_clip_skip_matches_diffusers_on_sd2(tiny_sd2, sd2_artifacts):
    oracle = Oracle(tiny_sd2)
    pipe = Pipeline.load(sd2_artifacts)
    most = pipe.manifest.facts.max_clip_skip
    assert most == 2   # the tiny SD 2 text encoder has 3 layers
    expected = oracle.generate_text(14, FOX, clip_skip=most)
    got = pipe(FOX, steps=STEPS, seed=14, clip_skip=most)
    assert _max_diff(got.pixels, expected) <= TOL


@pytest.mark.parametrize("bad,error", [(2, "clip_skip must be from 0 to 1"), (-1, "clip_skip must be from 0 to 1"),
                                       (1.0, "clip_skip must be an integer"), (True, "clip_skip must be an integer")])
def test_clip_skip_out_of_range_is_refused_naming_the_range(k1, bad, error):
    with pytest.raises((InvalidInput, TypeError), match=error):
        k1.artifact.request("a fox", clip_skip=bad)
