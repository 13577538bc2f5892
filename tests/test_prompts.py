"""The web UI's prompt syntax (runtime/prompts.py) against its documented behaviour:
the examples in AUTOMATIC1111's prompt_parser.py `parse_prompt_attention` docstring,
chunking facts derived from sd_hijack_clip.py `tokenize_line` with transformers'
CLIPTokenizer giving the token ids, and the "Original" emphasis computed in torch on
the tiny checkpoints' transformers CLIPTextModel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sdrt.engines.errors import InvalidInput, InvalidType
from sdrt.runtime.prompts import (Chunk, apply_emphasis, chunk_prompts, empty_chunk, pad_chunks,
                                  parse_prompt_attention, tokenize_chunks, truncate_chunks,
                                  truncation_message)
from sdrt.runtime.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

BOS, EOS = 49406, 49407
PAD = {"sd15": EOS, "sd2": 0}     # SD 1.x pads with <|endoftext|>, SD 2.x with "!" (OpenCLIP's id 0)

# The docstring of parse_prompt_attention (modules/prompt_parser.py), verbatim.
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", DOCUMENTED, ids=[t for t, _ in DOCUMENTED])
def test_parse_matches_the_web_ui_docstring_exactly(text, expected):
    assert parse_prompt_attention(text) == expected      # floats compared exactly


# Facts read off the web UI's grammar (re_attention / re_break and the bracket stacks).
SYNTAX = [
    ("", [("", 1.0)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]] b", [("a", 1 / 1.1 * (1 / 1.1)), (" b", 1.0)]),
    ("(a:1.5) b", [("a", 1.5), (" b", 1.0)]),
    ("(a : 1.5 ) b", [("a ", 1.5), (" b", 1.0)]),          # spaces around the weight
    ("(a:-.5)", [("a", -0.5)]),
    ("((a:2))", [("a", 2 * 1.1)]),
    ("[(a:2)]", [("a", 2 * (1 / 1.1))]),
    ("(a:x)", [("a:x", 1.1)]),                               # not a weight: text, then ")" closes
    ("(a:1.5", [("a:1.5", 1.1)]),                            # never closed: x1.1 to the end
    ("a:1.5) b] c", [("a:1.5) b] c", 1.0)]),                 # nothing open: closers are text
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 * (1 / 1.1))]),   # unclosed round first, then square
    ("\\\\ \\) \\[ \\]", [("\\ ) [ ]", 1.0)]),
    ("a\\b", [("ab", 1.0)]),                                 # a lone backslash disappears
    ("\\(a\\) (b)", [("(a) ", 1.0), ("b", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK b BREAKING", [("aBREAK b BREAKING", 1.0)]),    # BREAK only as a whole word
    ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),   # inside brackets it is scaled too
    ("(a)(b:1.1)c", [("ab", 1.1), ("c", 1.0)]),             # equal weights merge
]


@pytest.mark.parametrize("text, expected", SYNTAX, ids=[t or "empty" for t, _ in SYNTAX])
def test_parse_follows_the_web_ui_grammar(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "((a:..5))"])
def test_malformed_weight_is_invalid_input_naming_it(text):
    with pytest.raises(InvalidInput, match="attention weight '"):
        parse_prompt_attention(text)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["a"]])
def test_non_string_prompt_is_invalid_type(bad):
    with pytest.raises(InvalidType, match=type(bad).__name__):
        parse_prompt_attention(bad)


# ----------------------------------------------------------------------------- chunks

@pytest.fixture(scope="module", params=["sd15", "sd2"])
def family(request, tiny_sd15, tiny_sd2) -> tuple[str, Path]:
    return request.param, {"sd15": tiny_sd15, "sd2": tiny_sd2}[request.param]


@pytest.fixture(scope="module")
def tok(family) -> Tokenizer:
    return Tokenizer.from_folder(family[1] / "tokenizer")


@pytest.fixture(scope="module")
def oracle(family):
    """Token ids of a text without BOS/EOS, untruncated, by transformers' CLIPTokenizer."""
    ref = transformers.CLIPTokenizer.from_pretrained(family[1] / "tokenizer")
    return lambda text: ref(text, add_special_tokens=False, truncation=False).input_ids


def _expected_ids(tokens: list[int], pad: int) -> list[int]:
    return [BOS, *tokens, EOS] + [pad] * (75 - len(tokens))


def _check_chunk(chunk: Chunk, tokens: list[int], pad: int) -> None:
    assert chunk.ids.dtype == np.int64 and chunk.ids.shape == (77,)
    assert chunk.weights.dtype == np.float32 and chunk.weights.shape == (77,)
    assert chunk.ids.tolist() == _expected_ids(tokens, pad)
    assert chunk.length == len(tokens)


PLAIN = [
    "a watercolor fox",
    "A Photo Of An ASTRONAUT Riding A Horse On MARS, highly detailed; 8k!",
    "café naïve 日本語 emoji 😀🦊 1,000,000 it's don't",
    "hello! wow!! the pad token of SD 2.x typed literally!",
    "   ",
    "",
    "cat " * 75,
]


@pytest.mark.parametrize("weighting", [True, False])
@pytest.mark.parametrize("text", PLAIN, ids=range(len(PLAIN)))
def test_prompt_without_syntax_gives_the_tokenizers_ids(tok, text, weighting):
    chunks = tokenize_chunks(tok, text, weighting=weighting)
    assert len(chunks) == 1
    np.testing.assert_array_equal(chunks[0].ids, tok.encode(text)[0])
    assert (chunks[0].weights == 1.0).all()


_NO_SYNTAX = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="()[]\\:"), max_size=100)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_NO_SYNTAX)
def test_any_prompt_without_syntax_gives_the_tokenizers_ids(tok, oracle, text):
    assume("BREAK" not in text and len(oracle(text)) <= 75)
    (chunk,) = tokenize_chunks(tok, text)
    np.testing.assert_array_equal(chunk.ids, tok.encode(text)[0])


def test_literal_mode_keeps_the_syntax_characters(tok):
    text = "(masterpiece:1.2), [blurry] BREAK \\(x\\)"
    (chunk,) = tokenize_chunks(tok, text, weighting=False)
    np.testing.assert_array_equal(chunk.ids, tok.encode(text)[0])
    assert (chunk.weights == 1.0).all()


def test_weights_follow_their_tokens(tok, oracle, family):
    (chunk,) = tokenize_chunks(tok, "a (red fox:1.5) in [snow]")
    tokens = oracle("a red fox in snow")
    _check_chunk(chunk, tokens, PAD[family[0]])
    n_red, n_fox, n_in, n_snow = (len(oracle(w)) for w in ("red", "fox", "in", "snow"))
    expected = [1.0, 1.0] + [1.5] * (n_red + n_fox) + [1.0] * n_in + [np.float32(1 / 1.1)] * n_snow
    assert chunk.weights[:len(expected)].tolist() == expected
    assert (chunk.weights[len(expected):] == 1.0).all()      # EOS and padding


@pytest.mark.parametrize("n, chunks", [(1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_long_prompt_fills_chunks_of_75(tok, family, n, chunks):
    cat = tok.backend.token_to_id("cat</w>")
    out = tokenize_chunks(tok, "cat " * n)
    assert len(out) == chunks
    for i, chunk in enumerate(out):
        _check_chunk(chunk, [cat] * min(75, n - 75 * i), PAD[family[0]])


def test_chunks_hold_every_token_once_in_order(tok, oracle):
    text = "a highly detailed oil painting of a lighthouse on a cliff at sunset, dramatic clouds, " * 12
    out = tokenize_chunks(tok, text)
    joined = [t for c in out for t in c.ids[1:1 + c.length].tolist()]
    assert joined == oracle(text) and len(out) > 2
    assert all(c.length <= 75 for c in out)


def test_full_chunk_breaks_after_a_comma_within_20_tokens(tok, family):
    cat, dog, comma = (tok.backend.token_to_id(t) for t in ("cat</w>", "dog</w>", ",</w>"))
    # 70 cats, a comma (token 71), 10 dogs: 81 tokens; the chunk is full after 4 dogs and
    # the comma is 5 tokens from its end, so the 4 dogs move to the next chunk.
    first, second = tokenize_chunks(tok, "cat " * 70 + ", " + "dog " * 10)
    _check_chunk(first, [cat] * 70 + [comma], PAD[family[0]])
    _check_chunk(second, [dog] * 10, PAD[family[0]])
    assert (first.weights == 1.0).all() and (second.weights == 1.0).all()


def test_weights_move_with_the_tokens_after_the_comma(tok):
    first, second = tokenize_chunks(tok, "cat " * 70 + ", " + "(dog:1.3) " * 10)
    assert (first.weights == 1.0).all()
    assert second.weights[1:11].tolist() == [np.float32(1.3)] * 10 and second.weights[0] == 1.0


def test_comma_too_far_back_or_backtrack_off_splits_at_75(tok, family):
    cat, dog, comma = (tok.backend.token_to_id(t) for t in ("cat</w>", "dog</w>", ",</w>"))
    # The web UI's test is 75 - (index of the comma) <= 20. Comma at index 54: 21, no break.
    first, second = tokenize_chunks(tok, "cat " * 54 + ", " + "dog " * 30)
    _check_chunk(first, [cat] * 54 + [comma] + [dog] * 20, PAD[family[0]])
    _check_chunk(second, [dog] * 10, PAD[family[0]])
    # Comma at index 55: 20, it breaks there, unless the setting is 0 (off) or 19.
    text = "cat " * 55 + ", " + "dog " * 30
    assert [c.length for c in tokenize_chunks(tok, text)] == [56, 30]
    assert [c.length for c in tokenize_chunks(tok, text, comma_padding_backtrack=0)] == [75, 11]
    assert [c.length for c in tokenize_chunks(tok, text, comma_padding_backtrack=19)] == [75, 11]
    assert [c.length for c in tokenize_chunks(tok, text, comma_padding_backtrack=74)] == [56, 30]


def test_comma_as_the_76th_token_starts_the_next_chunk(tok):
    # The web UI notes the comma, finds the chunk full, starts a new one with the comma.
    out = tokenize_chunks(tok, "cat " * 75 + ", dog")
    assert [c.length for c in out] == [75, 2]
    assert out[1].ids[1] == tok.backend.token_to_id(",</w>")


def test_break_starts_a_new_chunk(tok, oracle, family):
    pad = PAD[family[0]]
    a, b = tokenize_chunks(tok, "a red fox BREAK (snow:1.2)")
    _check_chunk(a, oracle("a red fox"), pad)
    _check_chunk(b, oracle("snow"), pad)
    assert b.weights[1] == np.float32(1.2)
    # Leading BREAK: an empty first chunk; trailing BREAK: nothing after it.
    assert [c.length for c in tokenize_chunks(tok, "BREAK a")] == [0, 1]
    assert [c.length for c in tokenize_chunks(tok, "a BREAK")] == [1]
    assert [c.length for c in tokenize_chunks(tok, "a BREAK BREAK b")] == [1, 0, 1]
    # A full chunk then BREAK: no empty chunk in between.
    assert [c.length for c in tokenize_chunks(tok, "cat " * 75 + "BREAK b")] == [75, 1]
    # Literal mode and BREAK inside brackets (scaled to -1.1): the word "break" is text.
    assert [c.length for c in tokenize_chunks(tok, "a BREAK b", weighting=False)] == [3]
    (inside,) = tokenize_chunks(tok, "(a BREAK b)")
    assert inside.length == 3 and inside.weights[2] == np.float32(-1.1)


def test_empty_chunk_is_the_empty_prompt(tok, family):
    chunk = empty_chunk(tok)
    (empty,) = tokenize_chunks(tok, "")
    np.testing.assert_array_equal(chunk.ids, tok.encode("")[0])
    np.testing.assert_array_equal(chunk.ids, empty.ids)
    assert chunk.ids[2:].tolist() == [PAD[family[0]]] * 75 and chunk.length == 0
    assert (chunk.weights == 1.0).all()


def test_pad_gives_prompt_and_negative_the_same_chunk_count(tok):
    positive = tokenize_chunks(tok, "cat " * 100)
    negative = tokenize_chunks(tok, "blurry")
    pos, neg = pad_chunks(tok, [positive, negative])
    assert len(pos) == len(neg) == 2
    assert pos == positive and neg[0] is negative[0]
    np.testing.assert_array_equal(neg[1].ids, empty_chunk(tok).ids)
    assert [len(p) for p in pad_chunks(tok, [positive, negative], count=4)] == [4, 4]
    with pytest.raises(InvalidInput, match="cannot pad to 1 chunks: a prompt has 2"):
        pad_chunks(tok, [positive, negative], count=1)


def test_truncate_counts_the_dropped_prompt_tokens(tok):
    chunks = tokenize_chunks(tok, "cat " * 151)
    assert truncate_chunks(chunks, 3) == (chunks, 0)
    kept, dropped = truncate_chunks(chunks, 2)
    assert kept == chunks[:2] and dropped == 1
    kept, dropped = truncate_chunks(chunks, 1)
    assert kept == chunks[:1] and dropped == 76


@pytest.mark.parametrize("bad, error", [(0, InvalidInput), (-1, InvalidInput), (True, InvalidType),
                                        (1.0, InvalidType)])
def test_truncate_refuses_a_bad_limit(tok, bad, error):
    with pytest.raises(error, match=repr(bad)):
        truncate_chunks(tokenize_chunks(tok, "a"), bad)


@pytest.mark.parametrize("bad, error", [(-1, InvalidInput), (75, InvalidInput), (1.5, InvalidType)])
def test_backtrack_setting_is_checked(tok, bad, error):
    with pytest.raises(error, match="comma_padding_backtrack"):
        tokenize_chunks(tok, "a", comma_padding_backtrack=bad)


def test_tokenize_refuses_a_non_string(tok):
    with pytest.raises(InvalidType, match="int"):
        tokenize_chunks(tok, 42)


# --------------------------------------------------------------------------- emphasis

@pytest.fixture(scope="module")
def text_encoder(family):
    """The tiny checkpoint's text encoder with a random final LayerNorm. Built fresh,
    its bias is 0 and its weight 1, so every output vector has mean 0 and the web UI's
    mean ratio is 0 / 0 noise; trained CLIPs have learned ones, and so means that
    differ from token to token and from chunk to chunk."""
    model = transformers.CLIPTextModel.from_pretrained(family[1] / "text_encoder")
    # transformers 5 dropped the `text_model` level: find the layer by name.
    norm = {n: p for n, p in model.named_parameters() if "final_layer_norm" in n}
    (weight,), (bias,) = ([p for n, p in norm.items() if n.endswith(k)] for k in (".weight", ".bias"))
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.copy_(1 + 0.5 * torch.randn(weight.shape, generator=rng))
        bias.copy_(0.3 + 0.5 * torch.randn(bias.shape, generator=rng))
    return model.eval()


def _encode(model, chunks: list[Chunk]) -> np.ndarray:
    """The text encoder's last hidden state of each chunk, joined along the tokens: (1, 77 n, dim)."""
    ids = np.stack([c.ids for c in chunks])
    with torch.no_grad():
        z = model(input_ids=torch.from_numpy(ids)).last_hidden_state
    return z.reshape(1, -1, z.shape[-1]).numpy()


def _weights(chunks: list[Chunk]) -> np.ndarray:
    """The chunks' weights joined end to end, as their encodings are: (77 n,)."""
    return np.concatenate([c.weights for c in chunks])


def _web_ui_conditioning(model, chunks: list[Chunk]) -> torch.Tensor:
    """sd_hijack_clip.py forward/process_tokens with sd_emphasis.py EmphasisOriginal, for
    one prompt: each chunk encoded alone, reweighted, its mean restored, then hstack."""
    zs = []
    for chunk in chunks:
        tokens = torch.asarray([chunk.ids.tolist()])
        multipliers = torch.asarray([chunk.weights.tolist()])
        with torch.no_grad():
            z = model(input_ids=tokens).last_hidden_state
        original_mean = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        zs.append(z * (original_mean / new_mean))
    return torch.hstack(zs)


def test_emphasis_matches_the_web_ui_rule_in_torch(tok, text_encoder):
    prompt = "a (((red fox:1.3)) [in] the (snow:0.5), " + "(forest) " * 80 + "[[[dusk]]]"
    negative = "(blurry:1.4), [lowres]"
    pos, neg = pad_chunks(tok, [tokenize_chunks(tok, prompt), tokenize_chunks(tok, negative)])
    assert len(pos) == 2
    z = np.concatenate([_encode(text_encoder, pos), _encode(text_encoder, neg)])
    weights = np.stack([_weights(c) for c in (pos, neg)])
    out = apply_emphasis(z, weights)
    # The web UI encodes the negative prompt in its own call, then pads it with the
    # encoded empty prompt (sd_samplers_cfg_denoiser.py pad_cond).
    ref_pos = _web_ui_conditioning(text_encoder, pos).numpy()
    ref_neg = _web_ui_conditioning(text_encoder, neg[:1]).numpy()
    empty = _web_ui_conditioning(text_encoder, [empty_chunk(tok)]).numpy()
    expected = np.concatenate([ref_pos, np.concatenate([ref_neg, empty], axis=1)])
    assert out.dtype == np.float32 and out.shape == z.shape
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert not np.allclose(out, z, atol=1e-3)          # the weights did something


def test_unit_weights_leave_z_bit_for_bit(tok, text_encoder):
    chunks = tokenize_chunks(tok, "a red fox in the snow, " * 5)
    z = _encode(text_encoder, chunks)
    assert apply_emphasis(z, _weights(chunks)[None]) is z
    # And the web UI's own rule is exact there too: multiplying by 1 and by mean / mean.
    np.testing.assert_array_equal(_web_ui_conditioning(text_encoder, chunks).numpy(), z)


def test_unweighted_chunk_is_untouched_when_another_is_weighted(tok, text_encoder):
    chunks = tokenize_chunks(tok, "a red fox BREAK (snow:1.5)")
    z = _encode(text_encoder, chunks)
    out = apply_emphasis(z, _weights(chunks)[None])
    np.testing.assert_array_equal(out[:, :77], z[:, :77])
    assert not np.array_equal(out[:, 77:], z[:, 77:])
    # Each weighted chunk keeps its own mean.
    assert out[:, 77:].mean(dtype=np.float64) == pytest.approx(z[:, 77:].mean(dtype=np.float64), rel=1e-5)


@pytest.mark.parametrize("z_shape, w_shape", [((1, 77, 8), (1, 76)), ((1, 76, 8), (1, 76)), ((77, 8), (77,)),
                                               ((2, 77, 8), (1, 77))])
def test_emphasis_refuses_mismatched_shapes(z_shape, w_shape):
    with pytest.raises(InvalidInput, match="z must be"):
        apply_emphasis(np.zeros(z_shape, np.float32), np.ones(w_shape, np.float32))


def test_prompts_module_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, sdrt.runtime.prompts; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- batches

def test_last_kept_chunk_is_filled_to_75_not_broken_at_a_comma(tok, family):
    cat, dog, comma = (tok.backend.token_to_id(t) for t in ("cat</w>", "dog</w>", ",</w>"))
    text = "cat " * 70 + ", " + "dog " * 10
    (only,) = tokenize_chunks(tok, text, max_chunks=1)[:1]
    _check_chunk(only, [cat] * 70 + [comma] + [dog] * 4, PAD[family[0]])   # diffusers' first 75 tokens
    # Earlier chunks still break at the comma; the last one allowed does not.
    text = "cat " * 70 + ", " + "dog " * 70 + ", " + "cat " * 10
    assert [c.length for c in tokenize_chunks(tok, text)] == [71, 71, 10]
    assert [c.length for c in tokenize_chunks(tok, text, max_chunks=2)] == [71, 75, 6]


def test_chunk_prompts_pads_every_prompt_to_the_longest(tok, family):
    texts = ["", "cat " * 100, "dog"]
    batch = chunk_prompts(tok, texts, max_chunks=4)
    assert batch.ids.shape == (2, 3, 77) and batch.ids.dtype == np.int32 and batch.chunks == 2
    assert batch.weights.shape == (3, 154) and (batch.weights == 1.0).all()
    empty = empty_chunk(tok).ids
    assert batch.ids[1, 0].tolist() == empty.tolist() and batch.ids[1, 2].tolist() == empty.tolist()
    assert batch.ids[1, 1, :27].tolist() == [BOS] + [tok.backend.token_to_id("cat</w>")] * 25 + [EOS]
    assert batch.truncated == ()


def test_chunk_prompts_cuts_at_max_chunks_and_reports_what_was_dropped(tok):
    texts = ["cat " * 200, "dog " * 10, "cat " * 80]
    batch = chunk_prompts(tok, texts, max_chunks=2)
    assert batch.chunks == 2
    (cut,) = batch.truncated
    assert cut.prompt == texts[0] and cut.tokens == 200 and len(cut.dropped) == 50
    message = truncation_message(tok, batch.truncated, 2)
    assert "has 200 tokens; 50 were dropped" in message and "at most 2 chunk(s) of 75 tokens" in message
    assert "--max-prompt-chunks 2" in message


def test_chunk_prompts_literal_mode_keeps_brackets_as_tokens(tok, oracle):
    batch = chunk_prompts(tok, ["a (fox:1.5)"], weighting=False)
    tokens = oracle("a (fox:1.5)")
    assert batch.ids[0, 0, 1:len(tokens) + 1].tolist() == tokens and (batch.weights == 1.0).all()
