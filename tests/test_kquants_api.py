"""ggufkit.kquants' public API: validation errors, type lookup, chunking, encode/dequantize shapes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggufkit.kquants import api, dequantize, encode, qtype_of, quantize, supported_types
from reference.llama_cpp import ggml_quantize

pytestmark = pytest.mark.ggml


def gauss(rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng(rows * 7919 + cols).standard_normal((rows, cols), dtype=np.float32)


def test_qtype_of_accepts_names_and_rejects_unknown():
    assert qtype_of("q4_0") is T.Q4_0
    assert qtype_of(T.IQ4_XS) is T.IQ4_XS
    with pytest.raises(ValueError, match="unknown quantization type 'Q9_9'"):
        qtype_of("Q9_9")


def test_supported_types_include_legacy_and_iq4():
    assert {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.IQ4_XS} <= set(supported_types())


def test_unregistered_type_is_a_value_error():
    with pytest.raises(ValueError, match="no quantizer for Q8_1"):
        quantize(gauss(2, 256), T.Q8_1)


@pytest.mark.parametrize("shape", [(2, 3, 32), ()])
def test_weights_must_be_2d(shape):
    with pytest.raises(ValueError, match="must be 2-D"):
        quantize(np.zeros(shape, np.float32), T.Q8_0)


def test_row_length_must_be_a_block_multiple():
    with pytest.raises(ValueError, match="IQ4_XS: row length 288 is not a multiple of the block size 256"):
        quantize(gauss(2, 288), T.IQ4_XS)


@pytest.mark.parametrize("imatrix", [np.ones(31, np.float32), np.ones((1, 64), np.float32)])
def test_imatrix_shape_is_checked(imatrix):
    with pytest.raises(ValueError, match=r"imatrix must have shape \(64,\)"):
        quantize(gauss(2, 64), T.Q4_0, imatrix)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected(bad):
    x = gauss(2, 64)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="weights contain NaN or Inf"):
        quantize(x, T.Q4_0)
    im = np.ones(64, np.float32)
    im[3] = bad
    with pytest.raises(ValueError, match="imatrix contains NaN or Inf"):
        quantize(gauss(2, 64), T.Q4_0, im)


def test_one_dimensional_input_is_one_row():
    x = gauss(1, 64)
    np.testing.assert_array_equal(quantize(x[0], T.Q5_1), ggml_quantize(x, T.Q5_1))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.IQ4_XS])
def test_chunking_does_not_change_bytes(monkeypatch, qtype):
    x = gauss(7, 512)
    im = np.random.default_rng(3).exponential(size=512).astype(np.float32)
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 1000)  # one row per chunk, then several
    np.testing.assert_array_equal(quantize(x, qtype, im), ggml_quantize(x, qtype, im))


def test_encode_keeps_leading_dims_and_dequantize_inverts_shape():
    x = gauss(6, 64).reshape(2, 3, 64)
    q = encode(x, T.Q8_0)
    assert q.shape == (2, 3, 68) and q.dtype == np.uint8
    np.testing.assert_array_equal(q.reshape(6, -1), ggml_quantize(x.reshape(6, 64), T.Q8_0))
    back = dequantize(q.reshape(6, -1), "q8_0")
    assert back.shape == (6, 64) and back.dtype == np.float32
    assert np.abs(back - x.reshape(6, 64)).max() < 0.05


def test_encode_float_types_use_ggml_rounding():
    x = gauss(2, 64)
    np.testing.assert_array_equal(encode(x, T.F16), ggml_quantize(x, T.F16))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.IQ4_XS, T.IQ3_S])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_chunks_on_threads_give_ggmls_bytes(qtype, threads, monkeypatch):
    """Many row chunks (shorter than a group of lanes, uneven, ending mid-group) on 1..3 threads."""
    monkeypatch.setattr(api, "THREADS", threads)
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 3 * 1024)
    rng = np.random.default_rng(3)
    x = gauss(301, 1024)
    imatrix = rng.exponential(size=1024).astype(np.float32)
    for im in (None, imatrix):
        np.testing.assert_array_equal(quantize(x, qtype, im), ggml_quantize(x, qtype, im))


def test_set_threads_rejects_zero():
    with pytest.raises(ValueError, match="at least 1"):
        api.set_threads(0)
