"""The search helpers the quantizers share, against ggml's scalar definitions: rounding to the
nearest level (nearest_int) and IQ4's nearest-grid-value lookup (best_index_int8)."""

from __future__ import annotations

import numpy as np

from ggufkit.kquants.iq4 import INDEX, KVALUES, grid_index
from ggufkit.kquants.search import nearest_int, nearest_level


def test_nearest_level_equals_nearest_int_everywhere():
    """Fast path (np.rint) and fallback (ggml's bit trick, garbage for huge values) agree with ggml."""
    v = np.float32([0.5, 1.5, -0.5, -2.5, 3.49999, 2**21 - 0.5, 2**22 - 0.5, 2**22 + 3, 1e10, -1e10,
                    np.inf, -np.inf, np.nan])
    for lo, hi in ((0, 15), (-32, 31)):
        expect = np.clip(nearest_int(v), lo, hi)
        np.testing.assert_array_equal(nearest_level(v.copy(), lo, hi), expect)
        np.testing.assert_array_equal(nearest_level(v[:4].copy(), lo, hi), expect[:4])
        np.testing.assert_array_equal(nearest_level(v.copy(), lo, hi, np.abs(v)), expect)


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
