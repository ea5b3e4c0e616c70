"""IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S: ggml's lattice quantizers (quantize_row_iq3_xxs_impl,
quantize_row_iq3_s_impl, quantize_row_iq2_{xxs,xs,s}_impl), compiled.

A block of 32 or 16 elements is stored as sign bits, a 4-bit block scale under the super-block's fp16
scale, and |x| in groups of 4 (IQ3) or 8 (IQ2) levels that must form a point of the type's lattice
(`iq_grids`). Per block ggml tries a range of scales: at each, a group's rounded levels are kept if
they are a point, else the point nearest to them among their precomputed neighbours (weighted
distance); the scale of best fit wins, then groups are rounded again at that scale and it is refitted.

Kernel arguments as in `legacy`; the compiled kernels also take the lattice's tables (`with_lattice`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ggufkit.kquants.iq_grids import lattice
from ggufkit.kquants.jit import F32, GROUP_MAX_EPS, inline, kernel, nearest_int, put_fp16, stack_vec
from ggufkit.kquants.search import LANES, make_qp_quants

QK_K = 256
FLT_MAX = np.float32(3.4028234663852886e38)
OVERFLOW = "weights too large for the i-quant lattice search: its float32 distances overflow (ggml aborts too)"

# After the scale search, which groups ggml rounds again at the best scale: those off the grid, if
# any (IQ3_XXS, IQ2_XS, IQ2_S); all, if any is off the grid (IQ3_S); all (IQ2_XXS).
REFINE_OFF_GRID, REFINE_ALL_IF_OFF_GRID, REFINE_ALL = 0, 1, 2


def with_lattice(qtype, compiled):
    """The registry's kernel signature over a compiled kernel that also takes qtype's lattice tables
    (built on the first call)."""
    def run(x, qw, cols, out, nmax, type_size):
        g = lattice(qtype)
        compiled(x, qw, cols, out, type_size, g.coords, g.index, g.neighbours, g.listed_points)
    run.__name__ = run.__qualname__ = compiled.__name__
    return run


# ---- shared steps -------------------------------------------------------------------------------

@inline
def super_block_sigma2(x, base, factor):
    """factor * sum(x^2) / QK_K over the super-block at base, summed in order."""
    s = F32(0)
    for i in range(base, base + QK_K):
        s += x[i] * x[i]
    return F32(factor) * s / F32(QK_K)


@inline
def block_weights(x, qw, cols, base, n, sigma2, sigma2_bias, weight):
    """qw * sqrt(sigma2 + x^2) with an imatrix; without, x^2 (plus sigma2/4 where sigma2_bias: IQ2_S)."""
    for i in range(n):
        v = x[base + i]
        if qw.shape[0] > 0:
            weight[i] = qw[(base + i) % cols] * np.sqrt(sigma2 + v * v)
        elif sigma2_bias:
            weight[i] = F32(0.25) * sigma2 + v * v
        else:
            weight[i] = v * v


@inline
def fold_signs(x, base, n, weight, even, xval, signs):
    """xval = |x| with one sign byte per 8 elements. With `even`, only 7 sign bits are stored and the
    8th is their parity: for an odd count of negatives, ggml leaves the element of least weight*x^2
    negative in xval (first of equals) and flips its bit."""
    for k in range(n // 8):
        s, flips = 0, 0
        for i in range(8):
            v = x[base + 8 * k + i]
            if v >= 0:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                flips += 1
                s |= 1 << i
        if even and flips % 2 == 1:
            imin = 0
            v = x[base + 8 * k]
            least = weight[8 * k] * v * v
            for i in range(1, 8):
                v = x[base + 8 * k + i]
                a = weight[8 * k + i] * v * v
                if a < least:
                    least = a
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if even else s


@inline
def nearest_listed(neighbours, listed_points, start, dims, bits, level_step, level_base, scale, x, x_off, w, w_off,
                   dist):
    """find_best_neighbour's choice from the list at `start`: the listed point of least
    sum(w * (scale*q - x)^2) over the group (x from x_off, w from w_off, summed in order), q =
    level_step*level + level_base its level values; the first of equals, and ggml asserts that one
    is below FLT_MAX. The distances of whole vectors of listed points are computed at once
    (listed_points is padded at its end), then scanned in order."""
    count = np.int64(neighbours[start])
    mask = (1 << bits) - 1
    for first in range(0, count, LANES):
        for lane in range(LANES):
            key = np.int32(listed_points[start + 1 + first + lane])
            d2 = F32(0)
            for i in range(dims):
                q = F32((key >> (bits * i)) & mask) * level_step + level_base
                diff = scale * q - x[x_off + i]
                d2 += w[w_off + i] * diff * diff
            dist[first + lane] = d2
    best_d2, best = FLT_MAX, -1
    for j in range(count):  # selects, not branches: which entry wins is unpredictable
        better = dist[j] < best_d2
        best_d2 = dist[j] if better else best_d2
        best = j if better else best
    if best < 0:
        raise ValueError(OVERFLOW)
    return np.int32(neighbours[start + 1 + best])


@inline
def nearest_point(xval, waux, off, dims, bits, kmax, inv, scale, index, neighbours, listed_points, dist):
    """The point for the group at `off` at inverse scale `inv`: its rounded levels if they are a point,
    else their listed neighbour nearest in sum(waux * (scale*coord - xval)^2), coord = 2*level + 1.
    Returns (grid index, whether on the grid)."""
    key = 0
    for i in range(dims):
        l = nearest_int(F32(0.5) * (inv * xval[off + i] - F32(1)))
        key |= max(0, min(kmax - 1, l)) << (bits * i)
    g = index[key]
    if g >= 0:
        return g, True
    return nearest_listed(neighbours, listed_points, -g - 1, dims, bits, F32(2), F32(1), scale, xval, off, waux, off,
                          dist), False


@inline
def fit(xval, weight, n, dims, points, coords):
    """sum(w * x * q) and sum(w * q^2) over the block, q the coordinates of the groups' points."""
    sumqx, sumq2 = F32(0), F32(0)
    for i in range(n):
        q = F32(coords[points[i // dims], i % dims])
        sumqx += weight[i] * xval[i] * q
        sumq2 += weight[i] * q * q
    return sumqx, sumq2


@inline
def search_scale(xval, weight, waux, spec, top, scale, tables, points, trial, on_grid, trial_on_grid, dist):
    """ggml's scale search for one block whose largest level sits near `top`: inverse scales
    (2*kmax - 1 + is*step)/top for is in [-steps, steps], then the refit. `scale` is the result if no
    trial fits (ggml's starting scale); points receives each group's grid index. Returns the scale."""
    n, dims, bits, kmax, refine = spec.n, spec.dims, spec.bits, spec.kmax, spec.refine
    coords, index, neighbours, listed_points = tables
    groups = n // dims
    for k in range(groups):
        points[k] = 0  # ggml's L = 0: the point of key 0
        on_grid[k] = refine != REFINE_ALL_IF_OFF_GRID
    best = F32(0)
    for s in range(-spec.steps, spec.steps + 1):
        inv = (F32(2 * kmax - 1) + F32(s) * spec.step) / top
        this_scale = F32(1) / inv
        for k in range(groups):
            trial[k], trial_on_grid[k] = nearest_point(xval, waux, k * dims, dims, bits, kmax, inv, this_scale,
                                                       index, neighbours, listed_points, dist)
        sumqx, sumq2 = fit(xval, weight, n, dims, trial, coords)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for k in range(groups):
                points[k] = trial[k]
                on_grid[k] = trial_on_grid[k]
    off_grid = False
    for k in range(groups):
        off_grid |= not on_grid[k]
    if (off_grid or refine == REFINE_ALL) and scale > 0:
        inv = F32(1) / scale
        for k in range(groups):
            if refine != REFINE_OFF_GRID or not on_grid[k]:
                points[k], _ = nearest_point(xval, waux, k * dims, dims, bits, kmax, inv, scale,
                                             index, neighbours, listed_points, dist)
        sumqx, sumq2 = fit(xval, weight, n, dims, points, coords)
        if sumq2 > 0:
            scale = sumqx / sumq2
    return scale


@inline
def zero_block(spec, points, signs):
    """A block ggml skips: scale 0, every group at point 0, no sign bits; returns (scale, kept)."""
    for k in range(spec.n // spec.dims):
        points[k] = 0
    for k in range(spec.n // 8):
        signs[k] = 0
    return F32(0), False


@inline
def block_scratch(spec):
    """Per-block work arrays: weight, waux, xval, qp levels, sign bytes; per group: points, trial
    points, on grid, trial on grid; a neighbour search's distances (lists are at most 292 long)."""
    n, groups = spec.n, spec.n // spec.dims
    return (np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.uint8),
            np.empty(n // 8, np.uint8), np.empty(groups, np.int32), np.empty(groups, np.int32),
            np.empty(groups, np.bool_), np.empty(groups, np.bool_), stack_vec(np.float32))


@inline
def quantize_block(x, qw, cols, base, sigma2, spec, tables, scratch):
    """The block of spec.n elements at base: returns its scale (>= 0) and whether ggml kept it (else
    it skipped it as all zero), leaves its sign bytes and its groups' points in scratch."""
    weight, waux, xval, levels, signs, points, trial, on_grid, trial_on_grid, dist = scratch
    n, kmax, eps = spec.n, spec.kmax, spec.eps
    block_weights(x, qw, cols, base, n, sigma2, spec.sigma2_bias, weight)
    for i in range(n):
        waux[i] = np.sqrt(weight[i])
    fold_signs(x, base, n, weight, spec.even, xval, signs)
    top = xval[0]
    for i in range(1, n):
        top = top if top > xval[i] else xval[i]
    if top < eps or top == 0:  # IQ3_S (eps 0) tests !max
        return zero_block(spec, points, signs)
    if spec.from_qp:
        scale = make_qp_quants(xval, weight, kmax + 1, levels)
        top = scale * F32(kmax)  # ggml's eff_max
        if top <= 0:
            return zero_block(spec, points, signs)
    else:
        scale = top / F32(2 * kmax - 1)
    scale = search_scale(xval, weight, waux, spec, top, scale, tables, points, trial, on_grid, trial_on_grid, dist)
    if scale < 0:  # ggml: "should never happen"; flipping the signs keeps the values
        scale = -scale
        for k in range(n // 8):
            signs[k] = ~signs[k] & (127 if spec.even else 255)
    if not scale >= 0:
        raise ValueError(OVERFLOW)
    return scale, True


@inline
def block_scale(scale, inv, levels):
    """A block's scale in units of the super-block's d (inv = 1/d): nearest_int(0.5*(inv*scale - 1)),
    clamped to [0, levels - 1]."""
    return max(0, min(levels - 1, nearest_int(F32(0.5) * (inv * scale - F32(1)))))


class Search(NamedTuple):
    """A type's block search: block length n, groups of `dims` levels of `bits` bits in [0, kmax),
    blocks below eps skipped, sigma2 factor (2*sum(x^2) or sum(x^2) over QK_K), weights without an
    imatrix x^2 (+ sigma2/4 with sigma2_bias), 7-bit even-parity signs or 8-bit ones, search steps,
    refit mode, and IQ2_XXS's start from make_qp_quants."""
    n: int
    dims: int
    bits: int
    kmax: int
    eps: np.float32
    sigma2_factor: int
    sigma2_bias: bool
    even: bool
    steps: int
    step: np.float32
    refine: int
    from_qp: bool


IQ3_XXS = Search(32, 4, 3, 8, F32(1e-8), 2, False, True, 15, F32(0.2), REFINE_OFF_GRID, False)
IQ3_S = Search(32, 4, 3, 8, F32(0), 2, False, False, 9, F32(0.2), REFINE_ALL_IF_OFF_GRID, False)
IQ2_XXS = Search(32, 8, 2, 3, GROUP_MAX_EPS, 1, False, True, 6, F32(0.1), REFINE_ALL, True)
IQ2_XS = Search(16, 8, 2, 3, GROUP_MAX_EPS, 1, False, True, 9, F32(0.1), REFINE_OFF_GRID, False)
IQ2_S = Search(16, 8, 2, 3, F32(1e-8), 2, True, False, 9, F32(0.1), REFINE_OFF_GRID, False)


# ---- the kernels: the search per block, then each type's layout --------------------------------

@kernel
def iq3_xxs(x, qw, cols, out, type_size, coords, index, neighbours, listed_points):
    """98-byte super-blocks: d, 64 grid indices (8 per 32-block), then per 32-block a uint32 of four
    7-bit even-parity sign groups with the 4-bit scale on top."""
    spec, tables = IQ3_XXS, (coords, index, neighbours, listed_points)
    scratch = block_scratch(spec)
    signs, points = scratch[4], scratch[5]
    scales = np.empty(8, np.float32)
    for sb in range(x.shape[0] // QK_K):
        base, pos = sb * QK_K, sb * type_size
        sigma2 = super_block_sigma2(x, base, spec.sigma2_factor)
        max_scale = F32(0)
        for ib in range(8):
            scale, _ = quantize_block(x, qw, cols, base + 32 * ib, sigma2, spec, tables, scratch)
            for k in range(8):
                out[pos + 2 + 8 * ib + k] = points[k]
            packed = 0
            for k in range(4):
                packed |= np.int64(signs[k]) << (7 * k)
            for b in range(4):
                out[pos + 66 + 4 * ib + b] = (packed >> (8 * b)) & 0xFF
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == 0:
            out[pos:pos + type_size] = 0
            continue
        d = max_scale / F32(31)
        put_fp16(out, pos, d * F32(1.0125))
        inv = F32(1) / d
        for ib in range(8):
            out[pos + 66 + 4 * ib + 3] |= block_scale(scales[ib], inv, 16) << 4


@kernel
def iq3_s(x, qw, cols, out, type_size, coords, index, neighbours, listed_points):
    """110-byte super-blocks: d, the low 8 bits of 64 grid indices, their 9th bits (a byte per
    32-block), 8-bit sign groups, then 4-bit scales (two 32-blocks a byte). ggml stores the indices'
    low bits and the signs of the blocks it keeps one after the other: a skipped (zero) block moves
    the later blocks' bytes forward."""
    spec, tables = IQ3_S, (coords, index, neighbours, listed_points)
    scratch = block_scratch(spec)
    signs, points = scratch[4], scratch[5]
    scales = np.empty(8, np.float32)
    for sb in range(x.shape[0] // QK_K):
        base, pos = sb * QK_K, sb * type_size
        out[pos:pos + type_size] = 0
        sigma2 = super_block_sigma2(x, base, spec.sigma2_factor)
        max_scale = F32(0)
        kept = 0
        for ib in range(8):
            scale, keep = quantize_block(x, qw, cols, base + 32 * ib, sigma2, spec, tables, scratch)
            scales[ib] = scale
            if not keep:
                continue
            for k in range(8):
                out[pos + 2 + 8 * kept + k] = points[k] & 0xFF
                out[pos + 66 + ib] |= (points[k] >> 8) << k
            for k in range(4):
                out[pos + 74 + 4 * kept + k] = signs[k]
            kept += 1
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == 0:  # ggml keeps the points and signs written, with d = 0
            continue
        d = max_scale / F32(31)
        put_fp16(out, pos, d * F32(1.033))
        inv = F32(1) / d
        for ib in range(8):
            out[pos + 106 + ib // 2] |= block_scale(scales[ib], inv, 16) << (4 * (ib % 2))


@kernel
def iq2_xxs(x, qw, cols, out, type_size, coords, index, neighbours, listed_points):
    """66-byte super-blocks: d, then per 32-block 4 grid indices and a uint32 of four 7-bit
    even-parity sign groups with the 4-bit scale on top."""
    spec, tables = IQ2_XXS, (coords, index, neighbours, listed_points)
    scratch = block_scratch(spec)
    signs, points = scratch[4], scratch[5]
    scales = np.empty(8, np.float32)
    for sb in range(x.shape[0] // QK_K):
        base, pos = sb * QK_K, sb * type_size
        sigma2 = super_block_sigma2(x, base, spec.sigma2_factor)
        max_scale = F32(0)
        for ib in range(8):
            scale, _ = quantize_block(x, qw, cols, base + 32 * ib, sigma2, spec, tables, scratch)
            for k in range(4):
                out[pos + 2 + 8 * ib + k] = points[k]
            packed = 0
            for k in range(4):
                packed |= np.int64(signs[k]) << (7 * k)
            for b in range(4):
                out[pos + 6 + 8 * ib + b] = (packed >> (8 * b)) & 0xFF
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == 0:
            out[pos:pos + type_size] = 0
            continue
        d = max_scale / F32(31)
        put_fp16(out, pos, d)
        inv = F32(1) / d
        for ib in range(8):
            out[pos + 9 + 8 * ib] |= block_scale(scales[ib], inv, 16) << 4


@kernel
def iq2_xs(x, qw, cols, out, type_size, coords, index, neighbours, listed_points):
    """74-byte super-blocks: d, per 16-block two uint16 of a 9-bit grid index and 7 even-parity sign
    bits, then 4-bit scales (two 16-blocks a byte)."""
    spec, tables = IQ2_XS, (coords, index, neighbours, listed_points)
    scratch = block_scratch(spec)
    signs, points = scratch[4], scratch[5]
    scales = np.empty(16, np.float32)
    for sb in range(x.shape[0] // QK_K):
        base, pos = sb * QK_K, sb * type_size
        sigma2 = super_block_sigma2(x, base, spec.sigma2_factor)
        max_scale = F32(0)
        for ib in range(16):
            scale, _ = quantize_block(x, qw, cols, base + 16 * ib, sigma2, spec, tables, scratch)
            for k in range(2):
                q = points[k] | (np.int32(signs[k]) << 9)
                out[pos + 2 + 4 * ib + 2 * k] = q & 0xFF
                out[pos + 3 + 4 * ib + 2 * k] = q >> 8
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        out[pos + 66:pos + 74] = 0
        if max_scale == 0:
            out[pos:pos + type_size] = 0
            continue
        d = max_scale / F32(31)
        put_fp16(out, pos, d)
        inv = F32(1) / d
        for ib in range(16):
            out[pos + 66 + ib // 2] |= block_scale(scales[ib], inv, 16) << (4 * (ib % 2))


@kernel
def iq2_s(x, qw, cols, out, type_size, coords, index, neighbours, listed_points):
    """82-byte super-blocks: d, the low 8 bits of 32 grid indices, their 8-bit sign groups, the
    indices' top 2 bits (four a byte), then 4-bit scales (two 16-blocks a byte)."""
    spec, tables = IQ2_S, (coords, index, neighbours, listed_points)
    scratch = block_scratch(spec)
    signs, points = scratch[4], scratch[5]
    scales = np.empty(16, np.float32)
    for sb in range(x.shape[0] // QK_K):
        base, pos = sb * QK_K, sb * type_size
        out[pos:pos + type_size] = 0
        sigma2 = super_block_sigma2(x, base, spec.sigma2_factor)
        max_scale = F32(0)
        for ib in range(16):
            scale, _ = quantize_block(x, qw, cols, base + 16 * ib, sigma2, spec, tables, scratch)
            for k in range(2):
                i8 = 2 * ib + k
                out[pos + 2 + i8] = points[k] & 0xFF
                out[pos + 34 + i8] = signs[k]
                out[pos + 66 + i8 // 4] |= (points[k] >> 8) << (2 * (i8 % 4))
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == 0:  # ggml keeps the points and signs written, with d = 0
            continue
        d = max_scale / F32(31)
        put_fp16(out, pos, d * F32(0.9875))
        inv = F32(1) / d
        for ib in range(16):
            out[pos + 74 + ib // 2] |= block_scale(scales[ib], inv, 16) << (4 * (ib % 2))
