"""Real vocabularies beyond SmolLM2's and Gemma's: Llama 3 (llama-bpe), Qwen2 and Llama 2
(SentencePiece), from the vocabulary-only GGUFs llama.cpp's source ships for its tokenizer tests,
with the texts and expected token ids that go with them (models/ggml-vocab-*.gguf.inp/.out, made
by the original Hugging Face tokenizers).

Both directions: export-hf's tokenizer.json tokenizes the texts to the expected ids, and a tiny
checkpoint carrying it converts to the tokenizer metadata llama.cpp's own converter writes, which
llama.cpp then tokenizes the texts with to the same ids."""

from __future__ import annotations

import json

import pytest

from reference.llama_cpp import hf_to_gguf, llama_cpp_source
from tests import tiny_models
from tests.test_convert_parity import Gguf

pytestmark = pytest.mark.tools
# vocabulary -> the tiny family that carries it in the checkpoint test
VOCABS = {"llama-bpe": "llama", "qwen2": "qwen2", "llama-spm": "llama"}
SEPARATOR = "\n__ggml_vocab_test__\n"


def _vocab_file(name: str):
    return llama_cpp_source() / "models" / f"ggml-vocab-{name}.gguf"


def _cases(name: str) -> list[tuple[str, list[int]]]:
    path = _vocab_file(name)
    texts = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    ids = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    texts[-1] = texts[-1].removesuffix(SEPARATOR.rstrip("\n"))
    assert len(texts) >= 40
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids)]


@pytest.fixture(scope="module", params=sorted(VOCABS))
def exported(request, tmp_path_factory):
    """(vocabulary name, folder with the tokenizer files export-hf writes for it, its GGUF metadata)."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, tiny_models.llama_cpp_vocab(request.param, folder)


def test_exported_tokenizer_json_gives_the_reference_ids(exported):
    from tokenizers import Tokenizer

    name, folder, _ = exported
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, ids in _cases(name):
        assert tok.encode(text, add_special_tokens=False).ids == ids, (name, text)


@pytest.mark.slow
@pytest.mark.torch
def test_checkpoint_converts_like_llama_cpp_and_tokenizes_the_same(exported, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llama_cpp import Llama

    from ggufkit.convert.pipeline import convert

    name, folder, kv = exported
    n_vocab = len(kv["tokenizer.ggml.tokens"])
    sentencepiece = kv["tokenizer.ggml.model"] == "llama"
    # SentencePiece: also an older checkpoint's added_tokens.json, and a padding row past it
    ckpt = tiny_models.build(VOCABS[name], tmp_path / "hf", folder, vocab_size=n_vocab + 2 * sentencepiece,
                             hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             bos_token_id=kv["tokenizer.ggml.bos_token_id"], eos_token_id=kv["tokenizer.ggml.eos_token_id"])
    if sentencepiece:
        (ckpt / "added_tokens.json").write_text(json.dumps({"<extra_0>": n_vocab}), encoding="utf-8")
    ours = convert(ckpt, tmp_path / "ours.gguf", out_type="F32")
    ref = hf_to_gguf(ckpt, tmp_path / "ref.gguf", "f32")
    kv_ours, kv_ref = Gguf(ours).kv, Gguf(ref).kv
    tokenizer_keys = {k for k in kv_ref if k.startswith("tokenizer.")}
    assert tokenizer_keys == {k for k in kv_ours if k.startswith("tokenizer.")}
    for key in sorted(tokenizer_keys):
        assert kv_ours[key] == kv_ref[key], key
    assert kv_ours["tokenizer.ggml.pre"] == kv["tokenizer.ggml.pre"]
    llm = Llama(str(ours), vocab_only=True, verbose=False)
    for text, ids in _cases(name):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, (name, text)
