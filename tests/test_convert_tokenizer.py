"""BPE pre-tokenizer identification: from the tokenizer's own definition, cross-checked against
llama.cpp's table of hashes (its converter's ids for a check text)."""

from __future__ import annotations

import json

import pytest

from ggufkit.convert import tokenizer

# The GPT-2 split that ByteLevel(use_regex=True) applies, spelled out as a Split step.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@pytest.fixture
def smollm2_tokenizer(smollm2_hf, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text((smollm2_hf / "tokenizer.json").read_text(encoding="utf-8"), encoding="utf-8")
    return path


def _with_pre(path, pre, ignore_merges=False):
    tj = json.loads(path.read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = pre
    tj["model"]["ignore_merges"] = ignore_merges
    path.write_text(json.dumps(tj), encoding="utf-8")
    return tj


def test_smollm2_is_llama_cpps_smollm(smollm2_tokenizer):
    """export-hf's rebuilt tokenizer.json tokenizes the check text as the original SmolLM2 does."""
    _, table = tokenizer._known_hashes()
    assert table[tokenizer.llama_cpp_hash(smollm2_tokenizer)] == "smollm"
    tj = json.loads(smollm2_tokenizer.read_text(encoding="utf-8"))
    assert tokenizer.identify_pre_tokenizer(tj, smollm2_tokenizer) == "smollm"


def test_unfamiliar_definition_named_by_the_hash(smollm2_tokenizer):
    """The same split written another way: not a definition ggufkit knows, but the tokens are
    SmolLM2's, so llama.cpp's name for them is used."""
    tj = _with_pre(smollm2_tokenizer, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]})
    assert tokenizer._signature(tj) not in [tokenizer._signature(tokenizer.definition(name))
                                            for name in tokenizer.PRE_TOKENIZERS]
    assert tokenizer.identify_pre_tokenizer(tj, smollm2_tokenizer) == "smollm"


def test_definition_and_hash_disagree(smollm2_tokenizer, capsys):
    """SmolLM2's vocabulary has no merges across digits, so plain GPT-2 splitting tokenizes the check
    text as SmolLM2's own (individual digits) does: llama.cpp's name wins, with a warning."""
    tj = _with_pre(smollm2_tokenizer, tokenizer.PRE_TOKENIZERS["gpt-2"])
    assert tokenizer.identify_pre_tokenizer(tj, smollm2_tokenizer) == "smollm"
    assert "definition is gpt-2's, llama.cpp's table knows these tokens as smollm's" in capsys.readouterr().err


def test_definition_alone_when_llama_cpp_does_not_know_the_tokenizer(smollm2_tokenizer):
    """SmolLM2's vocabulary with Llama 3's split is no tokenizer in llama.cpp's table."""
    tj = _with_pre(smollm2_tokenizer, tokenizer.PRE_TOKENIZERS["llama-bpe"], ignore_merges=True)
    assert tokenizer._known_hashes()[1].get(tokenizer.llama_cpp_hash(smollm2_tokenizer)) is None
    assert tokenizer.identify_pre_tokenizer(tj, smollm2_tokenizer) == "llama-bpe"
    # the same split without Llama 3's whole-word lookup is Smaug's
    tj = _with_pre(smollm2_tokenizer, tokenizer.PRE_TOKENIZERS["llama-bpe"], ignore_merges=False)
    assert tokenizer.identify_pre_tokenizer(tj, smollm2_tokenizer) == "smaug-bpe"


def test_unloadable_tokenizer_json_is_not_cross_checked(tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE"}}')
    assert tokenizer.llama_cpp_hash(path) is None
    assert "not cross-checked" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.torch
def test_o200k_split_is_llama_cpps_gpt_4o(smollm2_hf, tmp_path):
    """GPT-OSS's tokenizer (o200k_harmony) splits words at case changes, as GPT-4o's does: its
    definition is identified as llama.cpp's gpt-4o, whose splitting then tokenizes as the tokenizers
    library does (SmolLM2's vocabulary with that split, a tokenizer llama.cpp's table does not know)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    from ggufkit.convert.pipeline import convert
    from tests import tiny_models

    ckpt = tiny_models.build("llama", tmp_path / "hf", smollm2_hf, hidden_size=32, num_hidden_layers=1)
    tj = _with_pre(ckpt / "tokenizer.json", tokenizer.PRE_TOKENIZERS["gpt-4o"])
    assert tokenizer._known_hashes()[1].get(tokenizer.llama_cpp_hash(ckpt / "tokenizer.json")) is None
    assert tokenizer.identify_pre_tokenizer(tj, ckpt / "tokenizer.json") == "gpt-4o"
    llm = Llama(str(convert(ckpt, tmp_path / "model.gguf", out_type="F32")), vocab_only=True, verbose=False)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for text in (tokenizer._known_hashes()[0], "camelCase HTTPServer XMLHttpRequest I'M YOU'LL We'Ve",
                 "path/to/file\n12345 3.14 ... ?!\n\n  x", "Ünïcödé ÀBC àbc Straße ΑΒΓ αβγ"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tok.encode(text, add_special_tokens=False).ids, text
