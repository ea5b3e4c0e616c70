"""SmolLM2 GGUF -> export-hf -> convert --type F32 gives back the original model exactly."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

pytestmark = pytest.mark.models


def test_export_hf_writes_a_checkpoint(smollm2_hf):
    names = {p.name for p in smollm2_hf.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 3
    tok_cfg = json.loads((smollm2_hf / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]


def test_f32_roundtrip_dequantizes_to_the_same_values(smollm2_gguf, smollm2_f32):
    orig = {t.name: t for t in gguf.GGUFReader(smollm2_gguf).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(smollm2_f32).tensors}
    assert set(orig) == set(ours)
    for name, t in orig.items():
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        got = ours[name]
        assert got.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(got.data), want, err_msg=name)


def test_roundtrip_keeps_the_tokenizer_metadata(smollm2_gguf, smollm2_f32):
    a, b = gguf.GGUFReader(smollm2_gguf), gguf.GGUFReader(smollm2_f32)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "llama.rope.freq_base", "llama.attention.head_count_kv"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_corpus_identically(smollm2_gguf, smollm2_f32, corpus):
    from llama_cpp import Llama

    text = (corpus / "emma.txt").read_bytes()
    ids = [Llama(str(p), vocab_only=True, verbose=False).tokenize(text, add_bos=True, special=False)
           for p in (smollm2_gguf, smollm2_f32)]
    assert len(ids[0]) > 100_000
    assert ids[0] == ids[1]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])  # byte-level BPE; SentencePiece with byte fallback
def test_exported_tokenizer_json_tokenizes_like_llama_cpp(model, request, corpus):
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    gguf_path, hf_dir = (request.getfixturevalue(f"{model}_{kind}") for kind in ("gguf", "hf"))
    text = (corpus / "emma.txt").read_text(encoding="utf-8")[:200_000]
    ours = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    llama = Llama(str(gguf_path), vocab_only=True, verbose=False)
    assert ours == llama.tokenize(text.encode(), add_bos=False, special=False)
    # control tokens (chat markers) between words: matched whole, as llama.cpp does with special=True
    hf = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    text = " and ".join(a["content"] for a in hf["added_tokens"] if a["special"])
    ours = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert ours == llama.tokenize(text.encode(), add_bos=False, special=True)


def test_split_max_size_writes_llama_gguf_split_shards(smollm2_hf, smollm2_f32, tmp_path):
    from llama_cpp import Llama

    from ggufkit.convert.pipeline import convert

    first = convert(smollm2_hf, tmp_path / "smol.gguf", out_type="F32", split_max_size=200 * 10**6)
    shards = sorted(tmp_path.glob("smol-*-of-*.gguf"))
    assert first == shards[0] and [p.name for p in shards] == [f"smol-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    readers = [gguf.GGUFReader(p) for p in shards]
    assert [r.fields["split.no"].contents() for r in readers] == [0, 1, 2]
    assert all(r.fields["split.count"].contents() == 3 for r in readers)
    whole = {t.name: t.data.tobytes() for t in gguf.GGUFReader(smollm2_f32).tensors}
    parts = {t.name: t.data.tobytes() for r in readers for t in r.tensors}
    assert parts == whole
    logits = []
    for path in (first, smollm2_f32):  # llama.cpp follows the shards itself
        llm = Llama(str(path), n_ctx=64, verbose=False, n_threads=2)
        llm.eval([1, 504, 3458])
        logits.append(np.array(llm.scores[2]))
    np.testing.assert_array_equal(logits[0], logits[1])
