"""ggufkit's F32 file scores the same perplexity as the F32 file llama.cpp's converter writes from
the same checkpoint (8k tokens of Emma, n_ctx 512, second half of each window scored)."""

from __future__ import annotations

import pytest

from reference.llama_cpp import hf_to_gguf

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.tools]


@pytest.mark.slow
def test_perplexity_equals_llama_cpp_converter(smollm2_hf, smollm2_f32, corpus, tmp_path):
    from ggufkit.runtime.perplexity import perplexity

    ref = hf_to_gguf(smollm2_hf, tmp_path / "ref-f32.gguf", "f32")
    chunks = 8192 // 512
    ours = perplexity(smollm2_f32, corpus / "emma.txt", ctx=512, chunks=chunks, threads=2)
    theirs = perplexity(ref, corpus / "emma.txt", ctx=512, chunks=chunks, threads=2)
    assert ours.chunks == theirs.chunks == chunks
    assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-4)
    assert 5 < ours.ppl < 100  # a real language model on English prose, not noise
