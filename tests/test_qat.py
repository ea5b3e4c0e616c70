"""Quantization-aware-trained / already-quantized float checkpoints convert with zero added error."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ggufkit.convert.pipeline import convert
from ggufkit.convert.prequantized import GRIDS, fit_grid
from ggufkit.kquants import quantize
from tests import tiny_models

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", sorted(GRIDS, key=lambda t: t.name))
def test_ggml_quantized_values_fit_back_to_the_same_bytes(qtype):
    x = np.random.default_rng(1).standard_t(3, size=(64, 256)).astype(np.float32)
    q = quantize(x, qtype)
    fit = fit_grid(gguf.quants.dequantize(q, qtype), qtype)
    assert fit is not None and fit.data.tobytes() == q.tobytes() and fit.max_error == 0


def test_values_off_the_grid_do_not_fit():
    x = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    assert all(fit_grid(x, t) is None for t in GRIDS)


def _on_symmetric_grid(w: np.ndarray) -> np.ndarray:
    """A common QAT export: per-32-block scale absmax/7 in fp16, codes -7..7 (never -8)."""
    b = w.reshape(-1, 32)
    d = (np.abs(b).max(axis=1) / 7).astype(np.float16).astype(np.float32)
    return (d[:, None] * np.clip(np.rint(b / d[:, None]), -7, 7)).reshape(w.shape).astype(np.float32)


@pytest.fixture(scope="module")
def qat_ckpt(smollm2_hf, tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tiny_models.build("llama", tmp_path_factory.mktemp("qat") / "hf", smollm2_hf)
    path = folder / "model.safetensors"
    tensors = {k: (_on_symmetric_grid(v) if v.ndim == 2 else v) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def _gguf_values(path):
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.torch
def test_symmetric_qat_checkpoint_converts_to_q4_0_exactly(qat_ckpt, tmp_path):
    report = []
    out = convert(qat_ckpt, tmp_path / "qat.gguf", out_type="Q4_0", report=report)
    assert report and all(r.exact and r.max_error == 0 for r in report)
    # the Q4_0 mixture would make the output matrix Q8_0; on the Q4_0 grid, it stays Q4_0, exactly
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2} == {Q.Q4_0}
    reference = convert(qat_ckpt, tmp_path / "f32.gguf", out_type="F32")
    ours, want = _gguf_values(out), _gguf_values(reference)
    for name, t in ((t.name, t) for t in gguf.GGUFReader(out).tensors if t.tensor_type == Q.Q4_0):
        np.testing.assert_array_equal(ours[name], want[name], err_msg=name)
    # ggml's own scale (max / -8) cannot express these blocks: plain re-quantization loses them.
    report_off = []
    plain = _gguf_values(convert(qat_ckpt, tmp_path / "off.gguf", out_type="Q4_0", qat=False, report=report_off))
    assert report_off == []
    assert max(np.abs(plain[n] - want[n]).max() for n in plain if n.startswith("blk.")) > 1e-3


@pytest.mark.torch
def test_noise_in_one_tensor_is_detected_for_that_tensor_alone(qat_ckpt, tmp_path):
    noisy = shutil.copytree(qat_ckpt, tmp_path / "noisy")
    tensors = load_file(noisy / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name] + np.float32(1e-4) * np.random.default_rng(3).standard_normal(
        tensors[name].shape).astype(np.float32)
    save_file(tensors, noisy / "model.safetensors", metadata={"format": "pt"})
    report = []
    convert(noisy, tmp_path / "noisy.gguf", out_type="Q4_0", report=report)
    off = [r.name for r in report if not r.exact]
    assert off == ["blk.1.ffn_up.weight"]
    assert next(r for r in report if not r.exact).max_error > 1e-4


@pytest.mark.torch
def test_type_auto_picks_the_grid_that_holds_the_checkpoint(qat_ckpt, tmp_path):
    reader = gguf.GGUFReader(convert(qat_ckpt, tmp_path / "a.gguf", out_type="auto"))
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {Q.Q4_0}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0


@pytest.mark.torch
def test_type_auto_falls_back_to_16_bit_floats(smollm2_hf, tmp_path):
    plain = tiny_models.build("llama", tmp_path / "plain", smollm2_hf)
    types = {x.tensor_type for x in gguf.GGUFReader(convert(plain, tmp_path / "p.gguf", out_type="auto")).tensors}
    assert types == {Q.F16, Q.F32}


@pytest.mark.slow
def test_smollm2_q4_1_export_converts_back_byte_identical(smollm2_gguf, smollm2_hf, tmp_path):
    report = []
    out = convert(smollm2_hf, tmp_path / "q41.gguf", out_type="Q4_1", report=report)
    orig = {t.name: t for t in gguf.GGUFReader(smollm2_gguf).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert sum(t.tensor_type == Q.Q4_1 for t in orig.values()) == 210
    # llama-quantize's Q4_1 mixture made token_embd (tied to the output) Q8_0: so does ours, exactly
    for name, t in orig.items():
        assert ours[name].tensor_type == t.tensor_type and ours[name].data.tobytes() == t.data.tobytes(), name
    assert all(r.exact for r in report) and len(report) == 211


@pytest.mark.slow
def test_type_auto_reproduces_a_mixed_q4_1_q8_0_export(smollm2_gguf, smollm2_hf, tmp_path):
    out = convert(smollm2_hf, tmp_path / "auto.gguf", out_type="auto")
    orig = {t.name: t for t in gguf.GGUFReader(smollm2_gguf).tensors}
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type == orig[t.name].tensor_type, t.name
        assert t.data.tobytes() == orig[t.name].data.tobytes(), t.name
