"""The compiled helpers the quantizers share, against ggml's scalar definitions: rounding to the
nearest level (nearest_int), fp16 conversion, and IQ4's nearest-grid-value lookup (best_index_int8)."""

from __future__ import annotations

import numpy as np
from numba import njit

from ggufkit.kquants.iq4 import KVALUES, grid_index
from ggufkit.kquants.jit import fp16_bits, fp16_value, nearest_int


@njit
def _map(fn_id, v):
    out = np.empty(v.shape[0], np.int64)
    for i in range(v.shape[0]):
        if fn_id == 0:
            out[i] = nearest_int(v[i])
        elif fn_id == 1:
            out[i] = grid_index(v[i])
        else:
            out[i] = fp16_bits(v[i])
    return out


@njit
def _halves(h):
    out = np.empty(h.shape[0], np.float32)
    for i in range(h.shape[0]):
        out[i] = fp16_value(h[i])
    return out


def magic_nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 12582912, keep the low 23 mantissa bits, subtract 2^22."""
    i = (v.astype(np.float32) + np.float32(12582912)).view(np.int32)
    return (i & 0x7FFFFF) - 0x400000


def test_nearest_int_is_ggmls_bit_trick_everywhere():
    rng = np.random.default_rng(0)
    v = np.float32([0.5, 1.5, -0.5, -2.5, 3.49999, 2**21 - 0.5, 2**22 - 0.5, 2**22 + 3, 1e10, -1e10,
                    np.inf, -np.inf, np.nan, 0.0, -0.0])
    v = np.concatenate([v, rng.standard_normal(10_000).astype(np.float32) * 100,
                        rng.integers(0, 2**32, 10_000, dtype=np.uint32).view(np.float32)])
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(_map(0, v), magic_nearest_int(v))


def test_fp16_conversions_equal_numpys_round_to_nearest_even():
    """Every bit pattern class: normals, halfway cases, subnormals, overflow, inf and NaN."""
    rng = np.random.default_rng(1)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint32),
                           (np.arange(0x33000000, 0x47800000, 0x1000, dtype=np.uint32))])  # every halfway
    v = bits.view(np.float32)
    v = v[~np.isnan(v)]  # numpy keeps signalling NaNs' payload differently; ggml never stores one
    with np.errstate(over="ignore"):
        expect = v.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_map(2, v), expect)
    np.testing.assert_array_equal(_map(2, np.float32([np.nan, -np.nan])),
                                  np.float32([np.nan, -np.nan]).astype(np.float16).view(np.uint16))
    halves = np.arange(2**16, dtype=np.uint16)
    np.testing.assert_array_equal(_halves(halves.astype(np.int64)).view(np.uint32),
                                  halves.view(np.float16).astype(np.float32).view(np.uint32))


def ggml_best_index(v: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, v) step by step in float32: bracket, then `v-a < b-v`."""
    vals = KVALUES.astype(np.float32)
    mu = np.clip(np.searchsorted(vals, v, side="right"), 1, 15)
    lo, hi = vals[mu - 1], vals[mu]
    idx = np.where(v - lo < hi - v, mu - 1, mu)
    return np.where(v <= vals[0], 0, np.where(v >= vals[15], 15, idx))


def test_grid_index_equals_best_index_int8():
    mids = (KVALUES[:-1].astype(np.float32) + KVALUES[1:]) / 2
    ulps = np.arange(-300, 301, dtype=np.int32)
    near = (mids[:, None].view(np.int32) + ulps).view(np.float32).ravel()  # every float near a midpoint
    rng = np.random.default_rng(0)
    v = np.concatenate([near, -near, rng.uniform(-300, 300, 200_000).astype(np.float32),
                        KVALUES.astype(np.float32), np.float32([0, -0.0, 1e-40, 1e30, -1e30, np.inf, -np.inf])])
    np.testing.assert_array_equal(_map(1, v), ggml_best_index(v))
    assert _map(1, np.float32([np.nan]))[0] == 15  # ggml's binary search ends on the last value
