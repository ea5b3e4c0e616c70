"""Every ggufkit.kquants type against ggml (ggml_quantize_chunk through ctypes): the same bytes
without an imatrix (ggml's quantize_row_*_ref) and with one (the *_impl paths), on real weights,
synthetic Gaussian / heavy-tailed / outlier-column data with zero and constant rows, and hypothesis
properties over shapes and magnitudes; dequantized values equal to ggml's dequantize_row_*; plus the
input errors. ggml aborts where the i-quants' lattice searches overflow float32: there ours must
refuse."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ggufkit.kquants import dequantize, quantize
from reference.llama_cpp import ggml_dequantize, ggml_quantize, ggml_quantize_or_abort
from reference.quantize import real_matrix

pytestmark = pytest.mark.ggml
K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
LEGACY_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.IQ4_XS]
NO_IMATRIX_TYPES = [T.TQ1_0, T.TQ2_0, T.MXFP4]  # ggml takes an imatrix and ignores it
LATTICE_TYPES = [T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M]
IMATRIX_ONLY = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}  # ggml_quantize_requires_imatrix
TYPES = K_TYPES + LEGACY_TYPES + NO_IMATRIX_TYPES + LATTICE_TYPES
IMATRIX = [False, True]
TYPES_AND_IMATRIX = [pytest.param(t, im, id=f"{t.name}-{'imatrix' if im else 'ref'}")
                     for t in TYPES for im in IMATRIX if im or t not in IMATRIX_ONLY]


def imatrix_choices(qtype) -> list[bool]:
    return [True] if qtype in IMATRIX_ONLY else IMATRIX


def assert_same_as_ggml(x: np.ndarray, qtype, imatrix=None) -> None:
    if qtype in LATTICE_TYPES:
        ref = ggml_quantize_or_abort(x, qtype, imatrix)
        if ref is None:
            with pytest.raises(ValueError, match="overflow"):
                quantize(x, qtype, imatrix)
            return
    else:
        ref = ggml_quantize(x, qtype, imatrix)
    ours = quantize(x, qtype, imatrix)
    if not np.array_equal(ours, ref):
        size = GGML_QUANT_SIZES[qtype][1]
        same = (ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1)
        bad = np.flatnonzero(~same)
        pytest.fail(f"{qtype.name}: {same.mean():.6f} of {same.size} blocks identical; "
                    f"first differing blocks {bad[:5].tolist()}")


def imatrix_for(cols: int, seed: int = 1) -> np.ndarray:
    im = np.random.default_rng(seed).exponential(size=cols).astype(np.float32)
    im[::7] = 0  # unused channels have exactly 0
    return im


@pytest.fixture(scope="module")
def real_weights(smollm2_gguf, gemma3_gguf) -> dict[str, np.ndarray]:
    """A few real matrices, truncated; rows of 1536 / 2048 are multiples of 256. Attention rows of
    576 / 640 are regrouped into 2304 / 2560."""
    return {
        "smollm2.ffn_down": real_matrix(smollm2_gguf, "blk.0.ffn_down.weight", 32),
        "smollm2.attn_q": real_matrix(smollm2_gguf, "blk.3.attn_q.weight", 32).reshape(-1, 2304),
        "gemma3.ffn_down": real_matrix(gemma3_gguf, "blk.0.ffn_down.weight", 32),
        "gemma3.ffn_gate": real_matrix(gemma3_gguf, "blk.2.ffn_gate.weight", 32).reshape(-1, 2560),
    }


def synthetic(kind: str, rows: int = 16, cols: int = 1024) -> np.ndarray:
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
        x[5, 64:] = 0  # zero sub-blocks and super-blocks inside a row
        x[6, ::2] = 2.5  # a repeated extreme: ggml keeps its first occurrence
        x[7, :16] = 0.5  # one constant sub-block
        x[8] = np.abs(x[8])  # all positive: the mins clamp at 0
        x[9] = -np.abs(x[9])  # all negative
        x[10] *= np.float32(2**-140)  # subnormals only: 1/max overflows
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("qtype, use_imatrix", TYPES_AND_IMATRIX)
@pytest.mark.parametrize("kind", ["gauss", "student_t3", "outlier_columns", "zero_and_constant_rows"])
def test_synthetic_matches_ggml(kind, qtype, use_imatrix):
    x = synthetic(kind)
    assert_same_as_ggml(x, qtype, imatrix_for(x.shape[1]) if use_imatrix else None)


@pytest.mark.parametrize("qtype, use_imatrix", TYPES_AND_IMATRIX)
def test_real_weights_match_ggml(real_weights, qtype, use_imatrix):
    for x in real_weights.values():
        assert_same_as_ggml(x, qtype, imatrix_for(x.shape[1]) if use_imatrix else None)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_equals_ggml_dequantized(real_weights, qtype):
    x = real_weights["gemma3.ffn_down"]
    for imatrix in [imatrix_for(x.shape[1]) if im else None for im in imatrix_choices(qtype)]:
        ours = dequantize(quantize(x, qtype, imatrix), qtype)
        ref = ggml_dequantize(ggml_quantize(x, qtype, imatrix), qtype)
        assert ours.shape == x.shape
        np.testing.assert_array_equal(ours, ref)
        # and it is a quantization of x (the 1-3 bit lattice types by their rms error: their worst
        # element can be off by more than half the largest)
        if qtype in LATTICE_TYPES:
            assert np.sqrt(np.mean((ours - x) ** 2)) < 0.6 * np.sqrt(np.mean(x ** 2))
        else:
            assert np.abs(ours - x).max() < 0.5 * np.abs(x).max()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_any_bytes_equals_ggml(qtype):
    """Blocks no quantizer writes (inf and NaN scales, unused codes) decode as ggml decodes them."""
    raw = np.random.default_rng(18).integers(0, 256, (64, 4 * GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(dequantize(raw, qtype), ggml_dequantize(raw, qtype))


def test_mxfp4_exponent_and_level_edges_match_ggml():
    """MXFP4's exponent is floorf(log2f(max|x|)), which libm rounds up to n for maxima just below 2^n,
    and its levels are the nearest of kvalue*d, overflowing near FLT_MAX: blocks whose maximum lies on
    and just below every power of two, with elements on and one ulp beside every level and midpoint of
    both candidate d."""
    rng = np.random.default_rng(39)
    multiples = np.array([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14], np.float32)
    blocks = []
    with np.errstate(over="ignore"):
        for n in range(-149, 129):
            tops = np.float32([2.0**n, 2.0**n * (1 - 2**-24), 2.0**n * (1 - 3 * 2**-24)])
            for d in np.float32([2.0**(n - 3), 2.0**(n - 4)]):
                v = multiples * d
                v = np.concatenate([v, np.nextafter(v, np.float32(0)), np.nextafter(v, np.float32(np.inf))])
                for top in tops[np.isfinite(tops)]:
                    block = rng.choice(v[np.isfinite(v) & (v <= top)], 32) * rng.choice(np.float32([-1, 1]), 32)
                    block[rng.integers(32)] = top
                    blocks.append(block)
    assert_same_as_ggml(np.array(blocks, np.float32), T.MXFP4)


# ---- properties: any shape and magnitude, compared with ggml's bytes ----

def block_of(qtype) -> int:
    return GGML_QUANT_SIZES[qtype][0]


@st.composite
def matrices(draw, qtype):
    rows = draw(st.integers(1, 3))
    cols = block_of(qtype) * draw(st.integers(1, 2 if block_of(qtype) == 256 else 3))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1e-3, 1.0, 1e4, 1e15, 1e30]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_t(draw(st.sampled_from([1, 3, 50])), (rows, cols)) * scale).astype(np.float32)
    row_kind = draw(st.sampled_from(["none", "zero", "constant", "neg_zero", "sparse"]))
    r = draw(st.integers(0, rows - 1))
    if row_kind == "sparse":
        x[r, rng.random(cols) < 0.9] = 0
    elif row_kind != "none":
        x[r] = {"zero": 0.0, "neg_zero": -0.0, "constant": np.float32(scale * draw(st.floats(-5, 5)))}[row_kind]
    return x


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@PROPERTY
@given(data=st.data())
def test_property_matches_ggml(qtype, data):
    x = data.draw(matrices(qtype))
    imatrix = None
    if data.draw(st.sampled_from(imatrix_choices(qtype))):
        imatrix = data.draw(hnp.arrays(np.float32, x.shape[1], elements=st.floats(0, 1e3, width=32)))
    assert_same_as_ggml(x, qtype, imatrix)


@pytest.mark.parametrize("qtype", LEGACY_TYPES + NO_IMATRIX_TYPES + LATTICE_TYPES, ids=lambda t: t.name)
@PROPERTY
@given(data=st.data())
def test_property_any_finite_floats_match_ggml(qtype, data):
    """Raw float32 values of any exponent (subnormals, near FLT_MAX): overflowing scales and inf/NaN
    intermediates must come out as ggml writes them."""
    x = data.draw(hnp.arrays(np.float32, (2, block_of(qtype)),
                             elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
    if qtype not in IMATRIX_ONLY:
        assert_same_as_ggml(x, qtype, None)
    assert_same_as_ggml(x, qtype, np.ones(x.shape[1], np.float32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rejects_bad_input(qtype):
    block = block_of(qtype)
    good = np.ones((2, block), np.float32)
    imatrix = np.ones(block, np.float32) if qtype in IMATRIX_ONLY else None
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        quantize(np.ones((2, block + 16), np.float32), qtype)
    with pytest.raises(ValueError, match="imatrix must have shape"):
        quantize(good, qtype, np.ones(block - 1, np.float32))
    bad = good.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(bad, qtype, imatrix)


@pytest.mark.parametrize("qtype", sorted(IMATRIX_ONLY), ids=lambda t: t.name)
def test_refuses_without_imatrix_as_ggml(qtype):
    """ggml asserts an imatrix for these types (ggml_quantize_requires_imatrix): one line saying so."""
    with pytest.raises(ValueError, match=f"^{qtype.name} needs an importance matrix"):
        quantize(np.ones((2, 256), np.float32), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_overflowing_intermediates_match_ggml(qtype):
    """Weights near 1e15-1e36 with an imatrix: the searches' sums and a super-block's sub-block scales
    overflow to inf or NaN, and levels must then follow ggml's nearest_int, not plain rounding (a
    fuzz run found Q3_K's scale-of-scales search diverging here)."""
    rng = np.random.default_rng(86)
    for scale in (2e15, 1e20, 1e36):
        x = (rng.standard_normal((2, 512)) * scale).astype(np.float32)
        for imatrix in (None, np.full(512, 795, np.float32), (rng.random(512) * 1000).astype(np.float32)):
            if imatrix is None and qtype in IMATRIX_ONLY:
                continue
            with np.errstate(all="ignore"):
                assert_same_as_ggml(x, qtype, imatrix)
