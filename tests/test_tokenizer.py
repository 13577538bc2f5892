"""The torch-free CLIP tokenizer against transformers.CLIPTokenizer (the oracle): the
same ids on a corpus of tricky prompts, for both pad conventions (SD 1.5 pads with
<|endoftext|>, SD 2.x with "!") and for every folder layout checkpoints ship."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from sdrt.engines.errors import ArtifactError, InvalidType, MissingFile  # noqa: E402
from sdrt.runtime.tokenizer import PromptTruncated, Tokenizer  # noqa: E402

LONG = "a highly detailed oil painting of a lighthouse on a cliff at sunset, dramatic clouds, " * 8
CORPUS = [
    "a watercolor fox",
    "A Photo Of An ASTRONAUT Riding A Horse On MARS",
    "hello, world! (masterpiece:1.2), [blurry]; {a|b} -- 'quoted' \"double\" ... ?!",
    "1234567890 3.14159 1,000,000 2nd 21st 0x1F",
    "café naïve résumé Ångström façade Ünïcödé e\u0301 (combining accent)",
    "emoji 😀🦊🔥 family 👨‍👩‍👧 flag 🇯🇵 skin 👍🏽",
    "日本語のテキスト 中文提示词 한국어 텍스트",
    "Привет мир مرحبا بالعالم नमस्ते दुनिया",
    "tabs\tand\nnewlines\r\nand   many     spaces",
    "   leading and trailing spaces   ",
    "",
    " ",
    LONG,
    "word " * 200,
    "x" * 400,
    "<|endoftext|>",
    "a cat <|endoftext|> a dog <|startoftext|>",
    "<|ENDOFTEXT|> uppercase special",
    "it's the cat's toy, don't, they're, we've, I'm, you'll, he'd",
    "IT'S DON'T WE'LL",
    "curly quotes it’s don’t",
    "hello! wow!! !!! ! the pad token of SD 2.x typed literally!",
    "</w> typed literally hello</w>",
    "non\u00a0breaking\u3000ideographic\u200bzero width",
    "control \x00 \x07 \x1b chars",
    "https://example.com/path?q=1&r=2 user@example.com #hashtag @mention",
]


def _oracle_ids(folder: Path, prompts: list[str]) -> np.ndarray:
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    return np.array(tok(prompts, padding="max_length", max_length=tok.model_max_length,
                        truncation=True).input_ids)


def _encode_quietly(tok: Tokenizer, prompts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncated)
        return tok.encode(prompts)


@pytest.fixture(scope="module", params=["sd15", "sd2"])
def tokenizer_folder(request, tiny_sd15, tiny_sd2) -> Path:
    """The tokenizer/ folder of the built-in model: vocab.json, merges.txt, configs, tokenizer.json."""
    return {"sd15": tiny_sd15, "sd2": tiny_sd2}[request.param] / "tokenizer"


@pytest.fixture(scope="module")
def layouts(tokenizer_folder, tmp_path_factory) -> dict[str, Path]:
    """The same tokenizer in the layouts checkpoints ship: with tokenizer.json, without it
    (diffusers' SD 1.5 / 2.1 repos), only tokenizer.json, and the legacy configs where the
    special tokens are serialised AddedTokens marked "normalized" (runwayml's SD 1.5)."""
    root = tmp_path_factory.mktemp(f"tok-{tokenizer_folder.parent.name}")
    out = {"as_built": tokenizer_folder}
    out["vocab_merges"] = shutil.copytree(tokenizer_folder, root / "vocab_merges")
    (out["vocab_merges"] / "tokenizer.json").unlink()
    out["json_only"] = shutil.copytree(tokenizer_folder, root / "json_only")
    (out["json_only"] / "vocab.json").unlink()
    (out["json_only"] / "merges.txt").unlink()
    legacy = out["legacy"] = shutil.copytree(out["vocab_merges"], root / "legacy")
    config = json.loads((legacy / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "unk_token"):
        config[key] = {"__type": "AddedToken", "content": config[key], "lstrip": False,
                       "normalized": True, "rstrip": False, "single_word": False}
    (legacy / "tokenizer_config.json").write_text(json.dumps(config))
    smap = {k: (v if k == "pad_token" else {"content": v, "lstrip": False, "normalized": True,
                                             "rstrip": False, "single_word": False})
            for k, v in json.loads((legacy / "special_tokens_map.json").read_text()).items()}
    (legacy / "special_tokens_map.json").write_text(json.dumps(smap))
    return out


@pytest.mark.parametrize("layout", ["as_built", "vocab_merges", "json_only", "legacy"])
def test_ids_equal_transformers_on_tricky_corpus(layouts, layout):
    folder = layouts[layout]
    ours = _encode_quietly(Tokenizer.from_folder(folder), CORPUS)
    ref = _oracle_ids(folder, CORPUS)
    assert ours.dtype == np.int32 and ours.shape == (len(CORPUS), 77)
    for prompt, a, b in zip(CORPUS, ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=f"prompt {prompt!r:.60}")


def test_pad_token_follows_the_checkpoint(tokenizer_folder):
    tok = Tokenizer.from_folder(tokenizer_folder)
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.model_max_length)
    # The two families differ exactly here: SD 1.5 pads with <|endoftext|>, SD 2.x with "!" (id 0).
    expected_pad = 0 if tokenizer_folder.parent.name.endswith("sd2") else 49407
    assert tok.encode([""])[0, -1] == expected_pad


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=120)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(_TEXT | st.sampled_from(CORPUS), min_size=1, max_size=3))
def test_ids_equal_transformers_on_random_unicode(tokenizer_folder, prompts):
    tok, ref = _cached(tokenizer_folder)
    ours = _encode_quietly(tok, prompts)
    np.testing.assert_array_equal(
        ours, ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


_CACHE: dict[Path, tuple] = {}


def _cached(folder: Path):
    if folder not in _CACHE:
        _CACHE[folder] = (Tokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder))
    return _CACHE[folder]


def test_long_prompt_warns_with_the_number_of_dropped_tokens(tokenizer_folder):
    tok, ref = _cached(tokenizer_folder)
    n_tokens = len(ref(LONG).input_ids) - 2          # without BOS / EOS
    with pytest.warns(PromptTruncated, match=rf"^{n_tokens - 75} token\(s\) of the prompt"):
        tok.encode([LONG])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncated)
        tok.encode(["x " * 75])                      # exactly 75 tokens + BOS + EOS: fits


def test_truncation_warning_quotes_the_dropped_text(tokenizer_folder):
    tok, _ = _cached(tokenizer_folder)
    with pytest.warns(PromptTruncated, match=r"truncated part: 'the end'"):
        tok.encode(["a " * 75 + "the end"])


def test_a_bare_string_is_one_prompt(tokenizer_folder):
    tok, _ = _cached(tokenizer_folder)
    np.testing.assert_array_equal(tok.encode("a fox"), tok.encode(["a fox"]))


@pytest.mark.parametrize("bad", [None, 42, b"bytes", ["ok", 3.5]])
def test_non_string_prompt_is_a_type_error_naming_the_type(tokenizer_folder, bad):
    tok, _ = _cached(tokenizer_folder)
    name = type(bad[1] if isinstance(bad, list) else bad).__name__
    with pytest.raises(InvalidType, match=name):
        tok.encode(bad)


def test_missing_folder_is_missing_file(tmp_path):
    with pytest.raises(MissingFile, match="tokenizer folder not found"):
        Tokenizer.from_folder(tmp_path / "nope")


def test_folder_without_vocabulary_names_the_files_it_needs(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(MissingFile, match="vocab.json and merges.txt, or tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_artifact_folder_finds_its_tokenizer_subfolder(layouts, tmp_path):
    shutil.copytree(layouts["vocab_merges"], tmp_path / "tokenizer")
    assert Tokenizer.from_folder(tmp_path).encode(["a fox"]).shape == (1, 77)


def test_corrupt_config_is_an_artifact_error(layouts, tmp_path):
    folder = shutil.copytree(layouts["vocab_merges"], tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="tokenizer_config.json"):
        Tokenizer.from_folder(folder)


def test_runtime_tokenizer_does_not_import_transformers():
    import subprocess
    import sys
    code = ("import sys, sdrt.runtime.tokenizer; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
