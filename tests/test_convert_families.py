"""Tiny random checkpoints of every supported family, made by transformers, convert to GGUF files
that llama.cpp runs like transformers' own forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import tiny_models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

PROMPT = [1, 504, 3458, 314, 253, 1837, 30, 2339, 2201, 1211]
N_NEW = 16
# Top-two logit gap below which either greedy pick is right: ~3x the float32 noise seen (<0.007)
NEAR_TIE = 0.02


# Families whose converter takes only SentencePiece vocabularies (tokenizer.model; Gemma 4: in tokenizer.json)
# carry one of llama.cpp's (from its source tree: `tools`); GLM-4 SmolLM2's with GLM's added tokens; the
# others SmolLM2's.
SPM_ONLY = {"gemma2", "phi3", "ernie4_5", "gemma4"}
OWN_TOKENIZER = SPM_ONLY | set(tiny_models.ADDED_TOKENS)


# GPT-OSS's released layout, MXFP4 experts (written as MXFP4), against transformers on their values
MXFP4 = "gpt_oss-mxfp4"


@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.tools) if f in SPM_ONLY else f
                                        for f in [*sorted(tiny_models.CONFIGS), MXFP4]])
def tiny(request, smollm2_hf, tmp_path_factory):
    """(name, the checkpoint transformers runs, the F32 GGUF llama.cpp runs)."""
    from ggufkit.convert.pipeline import convert

    root = tmp_path_factory.mktemp(request.param)
    if request.param == MXFP4:
        folder = tiny_models.with_mxfp4_experts(tiny_models.build("gpt_oss", root / "hf", smollm2_hf))
        return request.param, tiny_models.mxfp4_dequantized(folder, root / "dequantized"), \
            convert(folder, root / "model-f32.gguf", out_type="F32")
    tokenizer, overrides = (tiny_models.tokenizer_for(request.param, smollm2_hf, root / "vocab")
                            if request.param in OWN_TOKENIZER else (smollm2_hf, {}))
    folder = tiny_models.build(request.param, root / "hf", tokenizer, **overrides)
    return request.param, folder, convert(folder, folder.parent / "model-f32.gguf", out_type="F32")


def _hf_reference(folder):
    # the class the checkpoint names: image-text models have no AutoModelForCausalLM mapping
    model_cls = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])
    model = model_cls.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        seq = model.generate(torch.tensor([PROMPT]), max_new_tokens=N_NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0].tolist()
        logits = model(torch.tensor([seq])).logits[0].numpy()
    return seq, logits


def test_llama_cpp_matches_transformers(tiny):
    from llama_cpp import Llama

    family, folder, gguf_path = tiny
    seq, ref = _hf_reference(folder)
    llm = Llama(str(gguf_path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(seq)
    ours = np.array(llm.scores[: len(seq)])
    # Same logits along transformers' greedy continuation (teacher-forced), up to float32 noise.
    assert np.abs(ours - ref).max() < 2e-2 * max(1.0, np.abs(ref).max() / 10), family
    # Same greedy tokens, except where transformers' own top two are a near-tie.
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > NEAR_TIE
    picks = ours.argmax(-1)[len(PROMPT) - 1:-1]
    want = np.array(seq[len(PROMPT):])
    ok = decided[len(PROMPT) - 1:-1]
    assert ok.sum() >= N_NEW // 2, f"{family}: too many near-ties to judge"
    np.testing.assert_array_equal(picks[ok], want[ok], err_msg=family)


def test_free_running_greedy_decode_agrees(tiny):
    from llama_cpp import Llama

    family, folder, gguf_path = tiny
    seq, ref = _hf_reference(folder)
    llm = Llama(str(gguf_path), n_ctx=64, verbose=False, n_threads=2)
    toks = []
    for t in llm.generate(PROMPT, temp=0.0, top_k=1):
        toks.append(t)
        if len(toks) == N_NEW:
            break
    # Compare up to transformers' first near-tie: past it either continuation is right.
    top2 = np.sort(ref, axis=-1)[:, -2:]
    near_tie = np.flatnonzero((top2[:, 1] - top2[:, 0])[len(PROMPT) - 1:-1] <= NEAR_TIE)
    n = int(near_tie[0]) if near_tie.size else N_NEW
    assert toks[:n] == seq[len(PROMPT):len(PROMPT) + n], family
    if n < N_NEW:  # at the near-tie, llama.cpp must still pick one of transformers' top two
        assert toks[n] in np.argsort(ref[len(PROMPT) - 1 + n])[-2:], family
