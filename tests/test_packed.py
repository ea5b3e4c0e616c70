"""GPTQ, AWQ and compressed-tensors checkpoints, packed by the tests in each format's documented
layout, convert exactly where a GGUF block type can hold them and report their error elsewhere."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ggufkit.convert.pipeline import convert
from tests import tiny_models

Q = gguf.GGMLQuantizationType
pytest.importorskip("transformers")
pytestmark = pytest.mark.torch
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack(fields: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Consecutive `bits`-wide fields along `axis` into int32 words, field i at bit offset bits*i
    (AWQ additionally interleaves each group of 8 output columns in `order`)."""
    pf = 32 // bits
    f = np.moveaxis(fields.astype(np.uint32), axis, -1)
    f = f.reshape(*f.shape[:-1], -1, pf)
    if order is not None:
        f = f[..., order]
    words = np.zeros(f.shape[:-1], np.uint32)
    for i in range(pf):
        words |= f[..., i] << np.uint32(bits * i)
    return np.ascontiguousarray(np.moveaxis(words, -1, axis)).view(np.int32)


def quantize_groups(w: np.ndarray, group: int, sym: bool, rng, act_order: bool):
    """Per-(row, group) 4-bit codes as GPTQ makes them: (codes (out,in), zeros (out,G), scales fp16 (out,G), g_idx)."""
    out, cols = w.shape
    g_idx = np.arange(cols) // group
    if act_order:
        g_idx = g_idx[rng.permutation(cols)]
    G = cols // group
    scales, zeros = np.zeros((out, G), np.float16), np.zeros((out, G), np.int32)
    codes = np.zeros(w.shape, np.int32)
    for g in range(G):
        cols_g = g_idx == g
        x = w[:, cols_g]
        if sym:
            s, z = (np.abs(x).max(1) / 7.5).astype(np.float16), np.full(out, 8)
        else:
            lo, hi = x.min(1), x.max(1)
            s = ((hi - lo) / 15).astype(np.float16)
            z = np.clip(np.rint(-lo / s.astype(np.float32)), 0, 15).astype(np.int32)
        codes[:, cols_g] = np.clip(np.rint(x / s.astype(np.float32)[:, None]) + z[:, None], 0, 15)
        scales[:, g], zeros[:, g] = s, z
    return codes, zeros, scales, g_idx


def dequant(codes, zeros, scales, g_idx):
    return (scales[:, g_idx].astype(np.float32) * (codes - zeros[:, g_idx]).astype(np.float32)).astype(np.float32)


def make(kind: str, base, folder, group=32, sym=True, act_order=False):
    """Pack every linear layer of `base` in format `kind`; return the folder and the dequantized truth."""
    rng = np.random.default_rng(0)
    shutil.copytree(base, folder)
    tensors, truth = load_file(folder / "model.safetensors"), {}
    for name in [n for n in tensors if n.split(".")[-2] in LINEAR]:
        w = tensors.pop(name)
        c, z, s, g = quantize_groups(w, group, sym, rng, act_order)
        truth[name] = dequant(c, z, s, g)
        p = name[: -len("weight")]
        if kind == "gptq":
            tensors.update({p + "qweight": pack(c.T, 4, 0), p + "qzeros": pack(z.T - 1, 4, 1),
                            p + "scales": np.ascontiguousarray(s.T), p + "g_idx": g.astype(np.int32)})
        elif kind == "awq":
            order = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: field i holds column order[i] of each 8
            tensors.update({p + "qweight": pack(c.T, 4, 1, order), p + "qzeros": pack(z.T, 4, 1, order),
                            p + "scales": np.ascontiguousarray(s.T)})
        else:  # compressed-tensors: signed codes stored with +8, zero point packed along the output dim
            tensors.update({p + "weight_packed": pack(c - 8 + 8, 4, 1), p + "weight_scale": s,
                            p + "weight_shape": np.array(w.shape, np.int32)})
            if not sym:
                tensors[p + "weight_zero_point"] = pack(z - 8 + 8, 4, 0)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym, "desc_act": act_order},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
        "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                               "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": group,
                                                                         "symmetric": sym}}}},
    }[kind]
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, truth


@pytest.fixture(scope="module")
def base(smollm2_hf, tmp_path_factory):
    # Widths of 128 and 256, so that groups of 128 fit every layer.
    return tiny_models.build("llama", tmp_path_factory.mktemp("base") / "hf", smollm2_hf,
                             hidden_size=128, intermediate_size=256)


def _values(path):
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in gguf.GGUFReader(path).tensors}


def _check_runs(path):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=32, verbose=False, n_threads=2)
    llm.eval([1, 504, 3458])
    assert np.isfinite(llm.scores[2]).all()


@pytest.mark.parametrize("kind", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("group", [32, 128])
def test_symmetric_4_bit_converts_to_q4_0_exactly(kind, group, base, tmp_path):
    folder, truth = make(kind, base, tmp_path / "ckpt", group=group, sym=True)
    report = []
    out = convert(folder, tmp_path / "o.gguf", out_type="auto", report=report)
    reference = _values(convert(folder, tmp_path / "f32.gguf", out_type="F32"))
    got = _values(out)
    layers = [n for n in got if n.startswith("blk.") and got[n][0] != Q.F32]
    assert layers and all(got[n][0] == Q.Q4_0 for n in layers)
    for n in layers:
        np.testing.assert_array_equal(got[n][1], reference[n][1], err_msg=n)
    # ...and the F32 file holds exactly the format's own dequantization (q/k rows permuted by llama.cpp).
    np.testing.assert_array_equal(reference["blk.0.ffn_down.weight"][1], truth["model.layers.0.mlp.down_proj.weight"])
    assert all(r.exact for r in report if r.name in layers)
    _check_runs(out)


@pytest.mark.parametrize("kind,sym,act_order", [("gptq", False, False), ("gptq", True, True), ("awq", False, False),
                                                 ("compressed-tensors", False, False)])
def test_other_layouts_convert_and_report_their_error(kind, sym, act_order, base, tmp_path):
    folder, truth = make(kind, base, tmp_path / "ckpt", group=128, sym=sym, act_order=act_order)
    reference = _values(convert(folder, tmp_path / "f32.gguf", out_type="F32"))
    np.testing.assert_array_equal(reference["blk.1.ffn_up.weight"][1], truth["model.layers.1.mlp.up_proj.weight"])
    report = []
    out = convert(folder, tmp_path / "o.gguf", out_type="Q4_1" if not sym else "Q4_0", report=report)
    got = _values(out)
    off = [r for r in report if not r.exact]
    assert off, "expected tensors the block grid cannot hold"
    for r in off:
        assert r.max_error == pytest.approx(np.abs(got[r.name][1] - reference[r.name][1]).max(), rel=1e-6)
        assert r.max_error > 0
    _check_runs(out)


def test_unsupported_quant_method_is_one_line_error(base, tmp_path, capsys):
    from ggufkit.cli import main

    folder = shutil.copytree(base, tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", str(folder), "-o", str(tmp_path / "o.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "bitsandbytes" in err and "gptq" in err and len(err.splitlines()) == 1
