"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS: our bytes must equal ggml's (ggml_quantize_chunk
through ctypes), without and with an imatrix, on real and synthetic weights."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from benchmarks.kquants_speed import real_matrix
from ggufkit import models
from ggufkit.kquants import dequantize, quantize
from ggufkit.kquants.iq4 import INDEX, KVALUES, grid_index
from tests.reference import ggml_quantize

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.IQ4_XS]
IMATRIX = [False, True]


def assert_same_as_ggml(x: np.ndarray, qtype, imatrix=None) -> np.ndarray:
    ours = quantize(x, qtype, imatrix)
    ref = ggml_quantize(x, qtype, imatrix)
    if not np.array_equal(ours, ref):
        size = GGML_QUANT_SIZES[qtype][1]
        same = (ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1)
        bad = np.flatnonzero(~same)
        pytest.fail(f"{qtype.name}: {same.mean():.6f} of {same.size} blocks identical; "
                    f"first differing blocks {bad[:5].tolist()}")
    return ours


def imatrix_for(cols: int, seed: int = 1) -> np.ndarray:
    im = np.random.default_rng(seed).exponential(size=cols).astype(np.float32)
    im[::7] = 0  # imatrix entries are often exactly 0 for unused channels
    return im


@pytest.fixture(scope="module")
def real_weights() -> dict[str, np.ndarray]:
    """A few real matrices, truncated; rows of 1536/2048 are multiples of 256 (IQ4_XS). Rows of 576
    or 640 (attention) are regrouped into rows of 2304 / 2560."""
    return {
        "smollm2.ffn_down": real_matrix(models.SMOLLM2, "blk.0.ffn_down.weight", 48),
        "smollm2.attn_q": real_matrix(models.SMOLLM2, "blk.3.attn_q.weight", 64).reshape(-1, 2304),
        "gemma3.ffn_down": real_matrix(models.GEMMA3, "blk.0.ffn_down.weight", 48),
        "gemma3.ffn_gate": real_matrix(models.GEMMA3, "blk.2.ffn_gate.weight", 64).reshape(-1, 2560),
    }


def synthetic(kind: str, rows: int = 32, cols: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    if kind == "gauss":
        return rng.standard_normal((rows, cols), dtype=np.float32)
    if kind == "student_t3":
        return rng.standard_t(3, (rows, cols)).astype(np.float32)
    if kind == "outlier_columns":
        x = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        x[:, rng.choice(cols, 6, replace=False)] *= 300
        return x
    x = rng.standard_normal((rows, cols), dtype=np.float32)
    if kind == "zero_and_constant_rows":
        x[0], x[1], x[2], x[3] = 0, 0.75, -3.0, -0.0
        x[4, :100] = -0.0  # signed zeros decide the sign of fp16 zero scales in ggml
        x[5, 64:] = 0
        x[6, ::2] = 2.5  # a repeated extreme value: ggml keeps its first occurrence
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("use_imatrix", IMATRIX, ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gauss", "student_t3", "outlier_columns", "zero_and_constant_rows"])
def test_synthetic_matches_ggml(kind, qtype, use_imatrix):
    x = synthetic(kind)
    assert_same_as_ggml(x, qtype, imatrix_for(x.shape[1]) if use_imatrix else None)


@pytest.mark.parametrize("use_imatrix", IMATRIX, ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_real_weights_match_ggml(real_weights, qtype, use_imatrix):
    for x in real_weights.values():
        assert_same_as_ggml(x, qtype, imatrix_for(x.shape[1]) if use_imatrix else None)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_equals_ggml_dequantized(real_weights, qtype):
    x = real_weights["gemma3.ffn_down"]
    ours = dequantize(quantize(x, qtype, imatrix_for(x.shape[1])), qtype)
    ref = dequantize(ggml_quantize(x, qtype, imatrix_for(x.shape[1])), qtype)
    assert ours.shape == x.shape
    np.testing.assert_array_equal(ours, ref)
    assert np.abs(ours - x).max() < 0.2 * np.abs(x).max()  # and it is a quantization of x


def ggml_best_index(v: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, v) step by step in float32: bracket, then `v-a < b-v`."""
    vals = KVALUES.astype(np.float32)
    mu = np.clip(np.searchsorted(vals, v, side="right"), 1, 15)
    lo, hi = vals[mu - 1], vals[mu]
    idx = np.where(v - lo < hi - v, mu - 1, mu)
    return np.where(v <= vals[0], 0, np.where(v >= vals[15], 15, idx))


def test_grid_index_table_equals_best_index_int8():
    mids = (KVALUES[:-1].astype(np.float32) + KVALUES[1:]) / 2
    ulps = np.arange(-300, 301, dtype=np.int32)
    near = (mids[:, None].view(np.int32) + ulps).view(np.float32).ravel()  # every float near a midpoint
    rng = np.random.default_rng(0)
    v = np.concatenate([near, -near, rng.uniform(-300, 300, 200_000).astype(np.float32),
                        KVALUES.astype(np.float32), np.float32([0, -0.0, 1e-40, 1e30, -1e30])])
    ours = INDEX.take(grid_index(v, np.float32(1)))
    np.testing.assert_array_equal(ours, ggml_best_index(v))


# ---- properties: any shape and magnitude, compared with ggml's bytes ----

def block_of(qtype) -> int:
    return GGML_QUANT_SIZES[qtype][0]


@st.composite
def matrices(draw, qtype):
    rows = draw(st.integers(1, 4))
    cols = block_of(qtype) * draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_t(draw(st.sampled_from([1, 3, 50])), (rows, cols)) * scale).astype(np.float32)
    row_kind = draw(st.sampled_from(["none", "zero", "constant", "neg_zero"]))
    if row_kind != "none":
        x[draw(st.integers(0, rows - 1))] = {"zero": 0.0, "neg_zero": -0.0,
                                             "constant": np.float32(scale * draw(st.floats(-5, 5)))}[row_kind]
    return x


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@PROPERTY
@given(data=st.data(), use_imatrix=st.booleans())
def test_property_matches_ggml(qtype, data, use_imatrix):
    x = data.draw(matrices(qtype))
    imatrix = None
    if use_imatrix:
        imatrix = data.draw(hnp.arrays(np.float32, x.shape[1], elements=st.floats(0, 1e3, width=32)))
    assert_same_as_ggml(x, qtype, imatrix)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@PROPERTY
@given(data=st.data())
def test_property_any_finite_floats_match_ggml(qtype, data):
    """Raw float32 values of any exponent (subnormals, near FLT_MAX): overflowing scales and inf/NaN
    intermediates must come out as ggml writes them."""
    x = data.draw(hnp.arrays(np.float32, (2, block_of(qtype)),
                             elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
    assert_same_as_ggml(x, qtype, None)
    assert_same_as_ggml(x, qtype, np.ones(x.shape[1], np.float32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rejects_bad_input(qtype):
    block = block_of(qtype)
    good = np.ones((2, block), np.float32)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        quantize(np.ones((2, block + 16), np.float32), qtype)
    with pytest.raises(ValueError, match="imatrix must have shape"):
        quantize(good, qtype, np.ones(block - 1, np.float32))
    bad = good.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(bad, qtype)
