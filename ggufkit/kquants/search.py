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

    On a C-contiguous array with n_blocks > 1, np.add.reduce(axis=0) accumulates row after row
    (bit-identical, and faster than a Python loop); with one block, or on a strided view, it may
    sum pairwise, so those take the explicit loop. Adding +0.0 turns an all -0.0 sum into +0.0,
    as C's start from 0 does (and changes nothing else)."""
    if t.shape[1] > 1 and t.flags.c_contiguous:
        return np.add.reduce(t, axis=0) + np.float32(0)
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


def nearest_level(v: np.ndarray, lo, hi, bound: np.ndarray | None = None) -> np.ndarray:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32, computed in place in v (a temporary).

    np.rint equals nearest_int while |v| < 2^21, the common case: checked on `bound` (per-block
    upper bounds of |v|, when the caller knows them cheaply) or else with two reductions of v.
    Otherwise (huge, inf or NaN arguments) the bit trick reproduces ggml's garbage exactly."""
    big = np.float32(2**21)
    if bound is not None:
        fast = bool(bound.size == 0 or bound.max() < big)
    else:
        fast = v.size == 0 or bool(v.min() > -big and v.max() < big)
    r = np.rint(v, out=v) if fast else nearest_int(v).astype(np.float32)
    np.minimum(r, np.float32(hi), out=r)
    return np.maximum(r, np.float32(lo), out=r)


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
    (max, amax), max being the first element of largest magnitude, +0.0 when all are zero.
    A NaN never wins in C, while np.argmax picks it: rows with one are redone with NaN as 0."""
    mag = np.abs(a)
    idx = np.expand_dims(np.argmax(mag, axis=axis), axis)
    amax = np.take_along_axis(mag, idx, axis).squeeze(axis)
    if np.isnan(amax).any():
        return signed_absmax(np.where(np.isnan(a), np.float32(0), a), axis)
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
    mx, amax = signed_absmax(x)  # on x: numpy's argmax is much slower along a non-contiguous axis
    wx = wt * xt  # ggml's w*x[i]*l evaluates (w*x[i])*l
    lf, prod = np.empty_like(xt), np.empty_like(xt)  # reused by every step: no fresh temporaries

    # |iscale*x| <= nmax+1 for finite x (amax >= GROUP_MAX_EPS), so rint is nearest_int exactly. An inf
    # x (an overflowed scale fed back as data) makes iscale*x NaN, which ggml's nearest_int turns into 0.
    finite = bool(np.isfinite(amax).all())

    def sums(iscale):
        np.multiply(iscale, xt, out=lf)
        if finite:
            np.rint(lf, out=lf)
            np.clip(lf, -nmax, nmax - 1, out=lf)
        else:
            lf[...] = nearest_level(lf, -nmax, nmax - 1, amax)
        sumlx = block_sum(np.multiply(wx, lf, out=prod))
        np.multiply(wt, lf, out=prod)
        return sumlx, block_sum(np.multiply(prod, lf, out=prod))

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
    L = (nearest_level(best_iscale[:, None] * x, -nmax, nmax - 1) + np.float32(nmax)).astype(np.uint8)
    L[zero] = 0
    return L, np.where(zero, np.float32(0), scale)




def qkx_search(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float, rdelta: float,
               nstep: int, use_mad: bool = False):
    """ggml's make_qkx2_quants / make_qkx3_quants (identical but for weights=NULL, which only qkx3
    allows and which means w = x*x) for a batch of blocks.

    x: (n_blocks, n) float32; weights: same shape, or None.
    Returns (L uint8 (n_blocks, n) in [0, nmax], scale (n_blocks,), the_min (n_blocks,)) where
    the_min is ggml's `*the_min` (minus the block minimum: x ~ scale*L - the_min).
    """
    xt = columns(x)
    wt = xt * xt if weights is None else columns(weights)
    raw_min = first_extreme(xt, np.argmin, axis=0)  # first occurrence: the sign of a zero min matters
    mn = np.where(raw_min > 0, np.float32(0), raw_min)
    mx = first_extreme(xt, np.argmax, axis=0)
    sum_w = block_sum(wt)
    sum_x = block_sum(wt * xt)
    flat = mx <= mn
    flat_min = mn

    def weighted_error(scale, lf, lo):
        diff = scale * lf
        diff += lo
        diff -= xt
        diff = np.abs(diff, out=diff) if use_mad else np.multiply(diff, diff, out=diff)
        return block_sum(np.multiply(wt, diff, out=diff))

    def levels(iscale, lo):
        # x - lo lies between raw_min - lo and mx - lo: that bounds |iscale*(x - lo)| per block.
        bound = np.abs(iscale) * np.maximum(np.abs(raw_min - lo), np.abs(mx - lo))
        return nearest_level(iscale * (xt - lo), 0, nmax, bound)

    best_iscale = np.float32(nmax) / (mx - mn)
    lf = levels(best_iscale, mn)
    best_min = mn
    scale = np.float32(1) / best_iscale
    best_mad = weighted_error(scale, lf, mn)
    for step in range(nstep + 1):
        iscale = (np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)) / (mx - mn)
        lf = levels(iscale, mn)
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
    L = nearest_level(best_iscale[:, None] * (x - best_min[:, None]), 0, nmax).astype(np.uint8)
    L[flat] = 0
    return L, np.where(flat, np.float32(0), scale), -np.where(flat, flat_min, mn)


def make_qkx2_quants(x: np.ndarray, nmax: int, weights: np.ndarray, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool):
    """ggml's make_qkx2_quants (see qkx_search)."""
    return qkx_search(x, nmax, weights, rmin, rdelta, nstep, use_mad)


def make_qkx3_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float, rdelta: float,
                     nstep: int):
    """ggml's make_qkx3_quants(..., use_mad=false) (ggml never passes use_mad=true; see qkx_search)."""
    return qkx_search(x, nmax, weights, rmin, rdelta, nstep)


def sequential_max(x: np.ndarray) -> np.ndarray:
    """`float max = 0; for (...) max = MAX(max, x[i]);` over axis 1, MAX(a, b) = a > b ? a : b (a NaN
    is kept only until the next element replaces it, unlike np.max)."""
    m = np.zeros(len(x), np.float32)
    for col in x.T:
        m = np.where(m > col, m, col)
    return m


def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray):
    """ggml's make_qp_quants for a batch of blocks: non-negative levels L = MIN(nmax, round(x/scale)).

    x, weights: (n_blocks, n) float32 (small n: the sub-block scales of one super-block).
    Returns (L uint8 (n_blocks, n), scale (n_blocks,)). Like ggml, L is a uint8_t array: a negative
    level (negative x) is stored modulo 256, and the refinement then reads that stored value back.
    """
    mx = sequential_max(x)
    zero = mx < GROUP_MAX_EPS
    iscale = np.float32(nmax) / mx
    ic = iscale[:, None]
    stored = (nearest_int(ic * x) & 0xFF).astype(np.float32)
    best_mse = block_sum(columns(weighted_square(weights, x - (np.float32(1) / ic) * stored)))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(step) + np.float32(nmax)) / mx
        ci = iscale_is[:, None]
        lf = np.minimum(nearest_int(ci * x), nmax).astype(np.float32)
        mse = block_sum(columns(weighted_square(weights, x - (np.float32(1) / ci) * lf)))
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_is, iscale)
    lf = np.minimum(nearest_int(iscale[:, None] * x), nmax).astype(np.float32)
    wx = weights * x
    sumlx = block_sum(columns(wx * lf))
    suml2 = block_sum(columns(weights * lf * lf))
    stored = (lf.astype(np.int32) & 0xFF).astype(np.float32)
    for _ in range(5):
        changed = np.zeros(len(x), bool)
        for i in range(x.shape[1]):
            w, li = weights[:, i], stored[:, i]
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - w * li * li
            new_l = np.minimum(nearest_int(x[:, i] * sl2 / slx), nmax).astype(np.float32)
            new_slx = slx + wx[:, i] * new_l
            new_sl2 = sl2 + w * new_l * new_l
            take = ((slx > 0) & (sl2 > 0) & (new_l != li)
                    & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2))
            stored[:, i] = np.where(take, new_l.astype(np.int32) & 0xFF, li)
            sumlx = np.where(take, new_slx, sumlx)
            suml2 = np.where(take, new_sl2, suml2)
            changed |= take
        if not changed.any():
            break
    scale = np.where(suml2 > 0, sumlx / suml2, np.float32(0))
    L = stored.astype(np.uint8)
    L[zero] = 0
    return L, np.where(zero, np.float32(0), scale)


def weighted_square(w: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """C's `w*diff*diff`, evaluated left to right."""
    return w * diff * diff


def make_q3_quants(x: np.ndarray, nmax: int):
    """ggml's make_q3_quants(n, nmax, x, L, do_rmse=true) for a batch of blocks (w = x*x).

    Returns (L uint8 (n_blocks, n) in [0, 2*nmax-1], scale (n_blocks,)); all-zero blocks (max |x|
    below GROUP_MAX_EPS) get L = 0 and scale 0."""
    mx, amax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    xt = columns(x)
    lf = nearest_level((np.float32(-nmax) / mx) * xt, -nmax, nmax - 1)
    w = xt * xt
    wx = w * xt
    sumlx = block_sum(wx * lf)
    suml2 = block_sum(w * lf * lf)
    # A block with no change in a whole pass is at a fixed point: later passes only visit the others
    # (typically a fifth of the blocks after the first pass, then a quarter of those...).
    active = np.flatnonzero(q3_refine_pass(xt, w, wx, lf, sumlx, suml2, nmax))
    for _ in range(4):
        if active.size == 0:
            break
        la, sx, s2 = lf[:, active], sumlx[active], suml2[active]
        changed = q3_refine_pass(xt[:, active], w[:, active], wx[:, active], la, sx, s2, nmax)
        lf[:, active], sumlx[active], suml2[active] = la, sx, s2
        active = active[changed]
    L = (lf.T + np.float32(nmax)).astype(np.uint8)
    L[zero] = 0
    return L, np.where(zero | ~(suml2 > 0), np.float32(0), sumlx / suml2)


def q3_refine_pass(xt, w, wx, lf, sumlx, suml2, nmax: int) -> np.ndarray:
    """One pass of make_q3_quants' `for (i...)` level refinement over (n, n_blocks) arrays, updating
    lf, sumlx, suml2 in place; returns which blocks changed."""
    changed = np.zeros(lf.shape[1], bool)
    for i in range(len(lf)):
        li = lf[i]
        slx = sumlx - wx[i] * li
        sl2 = suml2 - w[i] * li * li
        new_l = nearest_level(xt[i] * sl2 / slx, -nmax, nmax - 1)
        new_slx = slx + wx[i] * new_l
        new_sl2 = sl2 + w[i] * new_l * new_l
        take = ((slx > 0) & (new_l != li) & (new_sl2 > 0)
                & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2))
        np.copyto(li, new_l, where=take)
        np.copyto(sumlx, new_slx, where=take)
        np.copyto(suml2, new_sl2, where=take)
        changed |= take
    return changed
