"""Parity with llama.cpp's own convert_hf_to_gguf.py on real checkpoints (exported with export-hf)
and on tiny checkpoints of every supported family: the same metadata and byte-identical tensors."""

from __future__ import annotations

import gguf
import pytest

from reference.llama_cpp import hf_to_gguf
from tests import tiny_models

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.torch, pytest.mark.tools, pytest.mark.models]
TYPES = ["F32", "F16", "BF16", "Q8_0"]
# Provenance that legitimately differs between runs and tools.
IGNORED_KEYS = ("general.quantized_by", "general.source", "general.uuid")


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def checkpoint(request):
    return request.getfixturevalue(f"{request.param}_hf")


def _kv(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("GGUF.") and not k.startswith(IGNORED_KEYS)}


@pytest.mark.parametrize("out_type", TYPES)
def test_same_metadata_and_tensor_bytes_as_llama_cpp(checkpoint, out_type, tmp_path):
    assert_converts_like_llama_cpp(checkpoint, out_type, tmp_path)


def test_gemma3_image_text_checkpoint_converts_its_text_model(gemma3_hf, tmp_path):
    """Gemma 3's 4B/12B/27B checkpoints wrap the text model (language_model.*) with a vision tower:
    a tiny one built by transformers converts as llama.cpp's converter converts it."""
    # 262208 rows, as the real ones have: 64 padding rows past the tokenizer's 262144 tokens
    ckpt = tiny_models.build("gemma3-multimodal", tmp_path / "hf", gemma3_hf, vocab_size=262208)
    assert_converts_like_llama_cpp(ckpt, "F32", tmp_path)


@pytest.mark.parametrize("family", sorted(tiny_models.CONFIGS))
def test_every_family_converts_like_llama_cpp(family, smollm2_hf, tmp_path):
    """Tiny checkpoints of each supported family (transformers' own configs and tensor names): the
    same metadata and tensors as llama.cpp's converter writes. Qwen's carry Qwen2's real vocabulary
    (llama.cpp's converter does not take SmolLM2's tokenizer for them), the others SmolLM2's."""
    overrides, tokenizer = {}, smollm2_hf
    if family.startswith("qwen"):
        tokenizer = tmp_path / "qwen2-vocab"
        overrides["vocab_size"] = len(tiny_models.llama_cpp_vocab("qwen2", tokenizer)["tokenizer.ggml.tokens"])
    ckpt = tiny_models.build(family, tmp_path / "hf", tokenizer, **overrides)
    assert_converts_like_llama_cpp(ckpt, "F32", tmp_path)


def test_tied_checkpoint_that_stores_its_head_anyway(smollm2_hf, tmp_path):
    """tie_word_embeddings with an lm_head.weight in the file (some training exports): llama.cpp's
    converter writes it as output.weight, and so does ggufkit."""
    from safetensors.numpy import load_file, save_file

    ckpt = tiny_models.build("llama", tmp_path / "hf", smollm2_hf, tie_word_embeddings=True)
    weights = load_file(ckpt / "model.safetensors")
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 0.5
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert_converts_like_llama_cpp(ckpt, "F32", tmp_path)
    names = [t.name for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors]
    assert "output.weight" in names and "token_embd.weight" in names


def assert_converts_like_llama_cpp(checkpoint, out_type, tmp_path):
    from ggufkit.convert.pipeline import convert

    ours = gguf.GGUFReader(convert(checkpoint, tmp_path / "ours.gguf", out_type=out_type))
    ref = gguf.GGUFReader(hf_to_gguf(checkpoint, tmp_path / "ref.gguf", out_type.lower()))
    kv_ours, kv_ref = _kv(ours), _kv(ref)
    assert kv_ours.keys() == kv_ref.keys()
    for key, value in kv_ref.items():
        assert kv_ours[key] == value, key
    t_ours = {t.name: t for t in ours.tensors}
    assert [t.name for t in ref.tensors if t.name not in t_ours] == []
    assert len(t_ours) == len(ref.tensors)
    for t in ref.tensors:
        mine = t_ours[t.name]
        assert mine.tensor_type == t.tensor_type, t.name
        assert list(mine.shape) == list(t.shape), t.name
        assert mine.data.tobytes() == t.data.tobytes(), t.name
