"""Error-feedback quantization: the input Hessians llama.cpp's graph gives, and what feedback buys."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggufkit.gguffile.hessian import hessian_width
from ggufkit.gptq import CODES, IQ4_LEVELS, IQ4_TYPES, Feedback, element_grids, fed_within, inverse_factor
from ggufkit.kquants import dequantize, quantize

Q = GGMLQuantizationType


def correlated(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight matrix and the H of inputs whose columns are correlated and unevenly scaled, as a
    transformer layer's inputs are."""
    rng = np.random.default_rng(seed)
    mix = 0.3 * rng.standard_normal((cols, cols)) + np.eye(cols)
    x = (rng.standard_normal((4 * cols, cols)) * np.exp(rng.standard_normal(cols))) @ mix
    return rng.standard_normal((rows, cols)).astype(np.float32), (x.T @ x).astype(np.float32)


def h_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """The change of the layer's output over the inputs of H: trace((W-Q) H (W-Q)^T)."""
    d = (w - q).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h.astype(np.float64), d))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_1, Q.IQ4_NL, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q6_K, Q.IQ4_XS])
def test_feedback_lowers_the_h_weighted_error(qtype):
    w, h = correlated(64, 512)
    plain = dequantize(quantize(w, qtype, np.diagonal(h).copy()), qtype)
    fed = dequantize(Feedback(h[None], GGML_QUANT_SIZES[qtype][0]).quantize(w, qtype), qtype)
    assert h_error(w, fed, h) < 0.8 * h_error(w, plain, h)


@pytest.mark.parametrize("qtype", list(CODES))
def test_element_grids_hold_every_quantized_value(qtype):
    """The grids read off a block's bytes (all codes 0, all codes 1) hold each dequantized value at
    an integer code in the type's range (a level of the IQ4 table): the layout table is right."""
    w, h = correlated(32, 512, seed=4)
    q = quantize(w, qtype, np.diagonal(h).copy())
    offset, step = element_grids(q, qtype)
    d = dequantize(q, qtype)
    lo, hi = CODES[qtype][2:]
    if qtype in IQ4_TYPES:
        assert np.isin(np.rint(d / step), IQ4_LEVELS).all()
    else:
        code = (d - offset) / np.where(step == 0, 1, step)
        np.testing.assert_allclose(code, np.rint(code), atol=1e-3)
        assert code.min() >= lo - 1e-3 and code.max() <= hi + 1e-3
    block = GGML_QUANT_SIZES[qtype][0]
    no_feedback = np.eye(block, dtype=np.float32)
    np.testing.assert_array_equal(fed_within(d[:, :block], offset[:, :block], step[:, :block], no_feedback, qtype),
                                  d[:, :block])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q3_K, Q.IQ4_NL])
def test_compiled_rounding_is_gptqs_column_loop(qtype):
    """The compiled inner loop equals GPTQ's column loop written in numpy: round column i to its grid,
    push (x_i - q_i) / U_ii times U's row i onto the later columns."""
    w, h = correlated(24, 256, seed=5)
    block = GGML_QUANT_SIZES[qtype][0]
    q = quantize(w[:, :block], qtype, np.diagonal(h)[:block].copy())
    offset, step = element_grids(q, qtype)
    u = inverse_factor(h[:block, :block].astype(np.float64))[0].astype(np.float32)
    x, want = w[:, :block].copy(), np.empty((24, block), np.float32)
    _, _, lo, hi = CODES[qtype]
    for i in range(block):
        if qtype in IQ4_TYPES:
            levels = IQ4_LEVELS * step[:, i, None]
            want[:, i] = levels[np.arange(24), np.abs(levels - x[:, i, None]).argmin(axis=1)]
        else:
            code = np.clip(np.rint((x[:, i] - offset[:, i]) / np.where(step[:, i] == 0, 1, step[:, i])), lo, hi)
            want[:, i] = offset[:, i] + step[:, i] * code
        x[:, i + 1:] -= np.outer((x[:, i] - want[:, i]) / u[i, i], u[i, i + 1:])
    got = fed_within(w[:, :block], offset, step, u, qtype)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert (got != w[:, :block]).any()


def test_inverse_factor():
    """H^-1 = U^T U with U upper triangular, and the second factor is U's inverse."""
    _, h = correlated(1, 320, seed=6)
    h = h.astype(np.float64)
    u, u_inv = inverse_factor(h)
    np.testing.assert_array_equal(u, np.triu(u))
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=0, atol=1e-7 * np.abs(np.linalg.inv(h)).max())
    np.testing.assert_allclose(u_inv @ u, np.eye(320), atol=1e-9)


def test_rows_are_independent():
    """Convert and quantize feed a tensor in row chunks: any split gives the same bytes."""
    w, h = correlated(48, 256, seed=1)
    fb = Feedback(h[None], 32)
    whole = fb.quantize(w, Q.Q4_0)
    parts = np.concatenate([fb.quantize(w[:17], Q.Q4_0), fb.quantize(w[17:], Q.Q4_0)])
    np.testing.assert_array_equal(whole, parts)


def test_feedback_stays_inside_each_h_block():
    """With H in diagonal blocks, a block's error moves only the columns of its own H block: the
    first block's bytes do not depend on the second block's weights."""
    w, h = correlated(16, 256, seed=2)
    blocks = np.stack([h[:128, :128], h[128:, 128:]])
    fb = Feedback(blocks, 32)
    other = w.copy()
    other[:, 128:] *= -3
    a, b = fb.quantize(w, Q.Q4_0), fb.quantize(other, Q.Q4_0)
    half = a.shape[1] // 2
    np.testing.assert_array_equal(a[:, :half], b[:, :half])
    assert not np.array_equal(a[:, half:], b[:, half:])


def test_dead_inputs_and_bad_shapes():
    w, h = correlated(8, 64, seed=3)
    h[:, 5] = h[5, :] = 0  # an input the calibration text never excited
    q = Feedback(h[None], 32).quantize(w, Q.Q8_0)
    assert np.isfinite(dequantize(q, Q.Q8_0)).all()
    with pytest.raises(ValueError, match="do not split"):
        Feedback(h[None, :48, :48], 32)
    with pytest.raises(ValueError, match="columns"):
        Feedback(h[None], 32).quantize(w[:, :32], Q.Q8_0)


@pytest.mark.parametrize("cols, width", [(576, 576), (2048, 2048), (5632, 512), (14336, 2048),
                                         (2880, 1440), (4096, 2048)])
def test_hessian_width(cols, width):
    assert hessian_width(cols) == width and cols % width == 0


# HF module -> GGUF weight, for the tiny Llama's linear layers
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus):
    """A tiny Llama (checkpoint, F32 GGUF) and its imatrix with Hessians over 3 windows of 64 tokens."""
    from ggufkit.convert.pipeline import convert
    from ggufkit.runtime.imatrix import collect
    from tests import tiny_models

    root = tmp_path_factory.mktemp("gptq")
    ckpt = tiny_models.numpy_llama(root / "hf")
    f32 = convert(ckpt, root / "f32.gguf", out_type="F32")
    text = corpus / "prideprejudice.txt"
    return ckpt, f32, text, collect(f32, [text], ctx=64, chunks=3, threads=2, hessians=True)


@pytest.mark.torch
def test_hessians_equal_the_inputs_transformers_computes(tiny):
    """H of every layer weight equals sum x x^T of the inputs of transformers' Linear modules on the
    windows llama.cpp saw; q/k/v share one H and gate/up another; diag(H) is the imatrix."""
    import torch
    from transformers import LlamaForCausalLM

    from ggufkit.runtime.load import Session
    from ggufkit.runtime.perplexity import read_text, split_windows

    ckpt, f32, text, imat = tiny
    with Session(f32, n_ctx=64, n_batch=64) as s:
        windows = split_windows(s.tokenize(read_text(text)), 64, 3, text)
        if s.bos is not None:  # as the collector does
            windows[:, 0] = s.bos
    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="eager")
    want: dict[str, np.ndarray] = {}

    def hook(name):
        def add(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
            want[name] = want.get(name, 0) + x.T @ x
        return add

    for i, layer in enumerate(model.model.layers):
        for path, kind in HF_TO_GGUF.items():
            layer.get_submodule(path).register_forward_pre_hook(hook(f"blk.{i}.{kind}.weight"))
    with torch.no_grad():
        model(torch.from_numpy(windows.astype(np.int64)))
    h = imat.hessian
    assert set(h.shares) == set(want)
    for name, ref in want.items():
        got = h.of(name)
        assert got.shape == (1, *ref.shape)
        np.testing.assert_allclose(got[0], ref, rtol=2e-3, atol=1e-3 * np.abs(ref).max())  # float32 sums
        np.testing.assert_allclose(np.diagonal(got[0]), imat.entries[name].sums[0], rtol=1e-4)
    for i in range(2):
        assert {h.shares[f"blk.{i}.{k}.weight"] for k in ("attn_q", "attn_k", "attn_v")} == {f"blk.{i}.attn_q.weight"}
        assert {h.shares[f"blk.{i}.{k}.weight"] for k in ("ffn_gate", "ffn_up")} == {f"blk.{i}.ffn_gate.weight"}
        assert h.shares[f"blk.{i}.ffn_down.weight"] == f"blk.{i}.ffn_down.weight"
    assert len(h.blocks) == 8  # 4 distinct inputs per layer


def test_hessians_travel_in_the_imatrix_file(tiny, tmp_path):
    from ggufkit.gguffile.imatrix import read_imatrix, write_imatrix

    imat = tiny[3]
    back = read_imatrix(write_imatrix(imat, tmp_path / "imatrix.gguf"))
    assert back.hessian.shares == imat.hessian.shares
    for owner, blocks in imat.hessian.blocks.items():
        np.testing.assert_array_equal(back.hessian.blocks[owner], blocks)
    plain = read_imatrix(write_imatrix(type(imat)(imat.entries, imat.datasets, imat.chunk_count, imat.chunk_size),
                                       tmp_path / "plain.gguf"))
    assert plain.hessian is None


def test_gptq_file_loads_and_ggml_method_ignores_the_hessians(tiny, tmp_path, capfd):
    """quantize with an imatrix carrying Hessians: gptq changes the bytes (same types, same size) and
    the model runs in llama.cpp; --method ggml writes what a plain imatrix gives."""
    from ggufkit.cli import main
    from ggufkit.commands.quantize import quantize_gguf
    from ggufkit.gguffile.imatrix import write_imatrix
    from reference.quantize import identical_tensors

    _, f32, _, imat = tiny
    with_h = write_imatrix(imat, tmp_path / "with-h.gguf")
    plain = write_imatrix(type(imat)(imat.entries, imat.datasets, imat.chunk_count, imat.chunk_size),
                          tmp_path / "plain.gguf")
    ggml = quantize_gguf(f32, tmp_path / "ggml.gguf", "Q4_0", imatrix=with_h, method="ggml")
    ref = quantize_gguf(f32, tmp_path / "ref.gguf", "Q4_0", imatrix=plain)
    gptq = quantize_gguf(f32, tmp_path / "gptq.gguf", "Q4_0", imatrix=with_h)
    assert identical_tensors(ggml.path, ref.path)[1] == []  # (quantize.imatrix.file names each imatrix)
    assert gptq.types == ref.types and gptq.path.stat().st_size == ref.path.stat().st_size
    differ = identical_tensors(gptq.path, ref.path)[1]
    assert any(n.startswith("blk.") for n in differ) and "token_embd.weight" not in differ
    assert main(["generate", str(gptq.path), "-p", "the", "-n", "4"]) == 0
    assert capfd.readouterr().out.strip()


def test_bad_methods_and_hessians(tiny, tmp_path):
    from ggufkit.commands.quantize import quantize_gguf
    from ggufkit.errors import GgufkitError
    from ggufkit.gguffile.hessian import Hessian
    from ggufkit.gguffile.imatrix import read_imatrix, write_imatrix

    _, f32, _, imat = tiny
    with pytest.raises(GgufkitError, match="unknown --method 'awq'"):
        quantize_gguf(f32, tmp_path / "x.gguf", "Q4_0", imatrix=write_imatrix(imat, tmp_path / "i.gguf"), method="awq")
    narrow = {o: b[:, :32, :32].copy() for o, b in imat.hessian.blocks.items()}
    bad = type(imat)(imat.entries, imat.datasets, imat.chunk_count, imat.chunk_size,
                     hessian=Hessian(narrow, imat.hessian.shares))
    path = write_imatrix(bad, tmp_path / "bad.gguf")
    with pytest.raises(GgufkitError, match="bad.gguf.*Hessian of 'blk.*has 32 columns"):
        read_imatrix(path)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_imatrix_hessian_then_quantize(tiny, tmp_path, capsys):
    """`imatrix --hessian` writes a file llama-quantize's loader and ours read; `quantize` uses its
    Hessians by default and not with --method ggml."""
    from ggufkit.cli import main
    from ggufkit.gguffile.imatrix import read_imatrix
    from reference.quantize import identical_tensors

    _, f32, text, _ = tiny
    imat = tmp_path / "imatrix.gguf"
    assert main(["imatrix", str(f32), "--text", str(text), "-o", str(imat), "--ctx", "64", "--chunks", "2",
                 "--hessian"]) == 0
    assert read_imatrix(imat).hessian is not None
    outs = {}
    for method in ("gptq", "ggml"):
        outs[method] = tmp_path / f"{method}.gguf"
        assert main(["quantize", str(f32), str(outs[method]), "Q4_0", "--imatrix", str(imat), "--method", method]) == 0
    assert identical_tensors(outs["gptq"], outs["ggml"])[1]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["quantize", str(f32), str(tmp_path / "x.gguf"), "Q4_0", "--imatrix", str(imat), "--method", "awq"])
    assert "invalid choice: 'awq'" in capsys.readouterr().err
