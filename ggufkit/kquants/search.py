"""ggml's scale searches and float helpers, vectorized over a batch of blocks.

Conventions shared by every function here:
- blocks are float32 arrays (n_blocks, block_len); weights have the same shape;
- arithmetic is float32 in ggml's operation order (no float64 upcast, no fused or reordered ops);
- a sum over a block runs sequentially like ggml's C loop (`block_sum` on a (block_len, n_blocks)
  array), so every partial sum rounds as in C.
"""

from __future__ import annotations

import numpy as np

GROUP_MAX_EPS = np.float32(1e-15)


def columns(blocks: np.ndarray) -> np.ndarray:
    """(n_blocks, n) -> contiguous (n, n_blocks): the layout `block_sum` needs."""
    return np.ascontiguousarray(blocks.T)


def block_sum(t: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of a (n, n_blocks) float32 array in C's order, `float s = 0; s += t[i]...`.

    An explicit loop over the n rows (each add vectorized over all blocks): np.add.reduce would
    switch to pairwise summation when the other axis has length 1. Starting from +0.0 turns an
    all -0.0 sum into +0.0, as in C."""
    s = t[0] + np.float32(0)
    for row in t[1:]:
        s += row
    return s


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit, as int32: round half to even for |v| < 2^22, and the same
    garbage as ggml's 12582912 magic-number trick outside that range (0 for NaN)."""
    i = np.add(v, np.float32(12582912), dtype=np.float32).view(np.int32)
    i &= 0x7FFFFF
    i -= 0x400000
    return i


def fp16_bits(a: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 as little-endian uint16: round to nearest even, overflow to inf."""
    return np.asarray(a, dtype=np.float32).astype(np.float16).view("<u2")


def inverse_or_zero(d: np.ndarray) -> np.ndarray:
    """C's `d ? 1/d : 0` (a NaN d is truthy and gives NaN)."""
    return np.where(d != 0, np.float32(1) / d, np.float32(0))


def first_extreme(a: np.ndarray, arg, axis: int = -1) -> np.ndarray:
    """The element picked by a C loop `if (v < best) best = v` (arg=np.argmin) or `>` (np.argmax):
    the first occurrence, which fixes the sign of a zero extreme."""
    idx = np.expand_dims(arg(a, axis=axis), axis)
    return np.take_along_axis(a, idx, axis).squeeze(axis)


def signed_absmax(a: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0:
    (max, amax), max being the first element of largest magnitude, +0.0 when all are zero."""
    mag = np.abs(a)
    idx = np.expand_dims(np.argmax(mag, axis=axis), axis)
    amax = np.take_along_axis(mag, idx, axis).squeeze(axis)
    mx = np.take_along_axis(a, idx, axis).squeeze(axis)
    return np.where(amax > 0, mx, np.float32(0)), amax


def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None):
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for a batch of blocks.

    x: (n_blocks, n) float32; weights: same shape, or None for ggml's qw=NULL (w = x*x).
    Returns (L uint8 (n_blocks, n) in [0, 2*nmax-1], scale float32 (n_blocks,)). Blocks whose
    max |x| is below GROUP_MAX_EPS get L = 0 and scale 0, as in ggml.
    """
    xt = columns(x)
    wt = xt * xt if weights is None else columns(weights)
    mx, amax = signed_absmax(xt, axis=0)
    wx = wt * xt  # ggml's w*x[i]*l evaluates (w*x[i])*l

    def sums(iscale):
        # |iscale*x| <= nmax+1 here (amax >= GROUP_MAX_EPS), so rint is nearest_int exactly.
        lf = np.clip(np.rint(iscale * xt), -nmax, nmax - 1)
        return block_sum(wx * lf), block_sum(wt * lf * lf)

    iscale = np.float32(-nmax) / mx
    best_iscale = iscale
    sumlx, suml2 = sums(iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / mx
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
        best_iscale = np.where(better, iscale, best_iscale)
    zero = amax < GROUP_MAX_EPS
    L = np.clip(np.rint(best_iscale[:, None] * x), -nmax, nmax - 1).astype(np.int8) + np.int8(nmax)
    L[zero] = 0
    return L.view(np.uint8), np.where(zero, np.float32(0), scale)


def make_qkx3_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float, rdelta: float,
                     nstep: int):
    """ggml's make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep,
    use_mad=false) for a batch of blocks (ggml never passes use_mad=true).

    x: (n_blocks, n) float32; weights: same shape, or None for ggml's weights=NULL (w = x*x).
    Returns (L uint8 (n_blocks, n) in [0, nmax], scale (n_blocks,), the_min (n_blocks,)) where
    the_min is ggml's `*the_min` (minus the block minimum: x ~ scale*L - the_min).
    """
    xt = columns(x)
    wt = xt * xt if weights is None else columns(weights)
    mn = first_extreme(xt, np.argmin, axis=0)  # first occurrence: the sign of a zero min matters
    mn = np.where(mn > 0, np.float32(0), mn)
    mx = first_extreme(xt, np.argmax, axis=0)
    sum_w = block_sum(wt)
    sum_x = block_sum(wt * xt)
    flat = mx <= mn
    flat_min = mn

    def levels(iscale, lo):
        # ggml gives l = 0 wherever iscale*(x - min) is not finite (its nearest_int of inf/NaN
        # clips to 0): a zero iscale plus NaN-dropping fmax/fmin reproduce that, while for finite
        # iscale the argument is bounded by ~nmax, where rint is nearest_int exactly.
        iscale = np.where(np.isfinite(iscale), iscale, np.float32(0))
        lf = np.rint(iscale * (xt - lo))
        return np.fmin(np.fmax(lf, np.float32(0), out=lf), np.float32(nmax), out=lf), iscale

    def weighted_error(scale, lf, lo):
        diff = scale * lf + lo - xt
        return block_sum(wt * (diff * diff))

    lf, best_iscale = levels(np.float32(nmax) / (mx - mn), mn)
    best_min = mn
    scale = np.float32(1) / (np.float32(nmax) / (mx - mn))
    best_mad = weighted_error(scale, lf, mn)
    for step in range(nstep + 1):
        iscale = (np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)) / (mx - mn)
        lf, iscale = levels(iscale, mn)
        wl = wt * lf
        sum_l, sum_l2, sum_xl = block_sum(wl), block_sum(wl * lf), block_sum(wl * xt)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = np.where(positive, np.float32(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        mad = weighted_error(this_scale, lf, this_min)
        better = (D > 0) & (mad < best_mad)
        best_mad = np.where(better, mad, best_mad)
        scale = np.where(better, this_scale, scale)
        best_iscale = np.where(better, iscale, best_iscale)
        best_min = np.where(better, mn, best_min)  # the min these levels were computed from
        mn = np.where(better, this_min, mn)  # ggml updates min inside the loop: later steps use it
    L = np.rint(best_iscale[:, None] * (x - best_min[:, None]))
    L = np.fmin(np.fmax(L, np.float32(0), out=L), np.float32(nmax), out=L).astype(np.uint8)
    L[flat] = 0
    return L, np.where(flat, np.float32(0), scale), -np.where(flat, flat_min, mn)
