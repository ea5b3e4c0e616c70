"""IQ1_S and IQ1_M: ggml's 1.5 and 1.75 bit quantizers (quantize_row_iq1_s_impl,
quantize_row_iq1_m_impl), compiled.

Each element is one of three levels, valued level - 1 + shift*DELTA with a shift of +1 or -1 per
group of 8 (ggml's x_p and x_m; one shift per block in IQ1_S, per half block in IQ1_M). Per block
ggml sorts the elements and tries every split of the sorted order into the three levels, with each
choice of shifts, keeping the best weighted fit; each group of 8 levels must then be a point of the
2048-point lattice, else the nearest of its precomputed neighbours (`iq_grids`).

Kernel arguments as in `lattice`.
"""

from __future__ import annotations

import numpy as np

from ggufkit.kquants.jit import F32, fp16_bits, inline, kernel, nearest_int, put_fp16, stack_vec
from ggufkit.kquants.lattice import FLT_MAX, OVERFLOW, QK_K, block_weights, nearest_listed, super_block_sigma2

DELTA = F32(0.125)
# IQ1_M's qh shift bits of a block's two groups, by its shift choice (bit 1: first group at -1).
SHIFT_MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.uint8)


@inline
def level_value(level, shift):
    """ggml's x_p[level] (shift 1) or x_m[level] (shift -1), exactly."""
    return F32(level - 1) + F32(shift) * DELTA


@inline
def half_shift(choice, k):
    """IQ1_M: the shift of group k (0, 1) of a block under its choice 0..3 (ggml's ++, +-, -+, --)."""
    return -1 if (choice >> (1 - k)) & 1 else 1


@inline
def sort_block(x, base, n, order):
    """order = the block's element indices by ascending x, equal values in index order: ggml sorts
    (x, index) pairs with qsort comparing x alone, which glibc (2.36, the reference's) does with a
    stable merge sort."""
    for j in range(n):
        v = x[base + j]
        i = j
        while i > 0 and v < x[base + order[i - 1]]:
            order[i] = order[i - 1]
            i -= 1
        order[i] = j


@inline
def assign_levels(order, n, first, second, flip, levels):
    """Levels 0, 1, 2 by sorted position (before `first`, before `second`, the rest), mirrored if flip."""
    for j in range(n):
        l = 0 if j < first else 1 if j < second else 2
        levels[order[j]] = 2 - l if flip else l


@inline
def group_point(x, base, weight, levels, off, scale, shift, index, neighbours, listed_points, dist):
    """iq1_find_best_neighbour2 after ggml's map lookup: the group's levels at off if they are a point,
    else the listed neighbour nearest in sum(w * (scale*value - x)^2). Returns (grid index, whether
    on the grid). Where no neighbour is below FLT_MAX ggml scans the whole grid reading past the
    block (nearest_listed refuses)."""
    key = 0
    for i in range(8):
        key |= np.int32(levels[off + i]) << (2 * i)
    g = index[key]
    if g >= 0:
        return g, True
    return nearest_listed(neighbours, listed_points, -g - 1, 8, 2, F32(1), level_value(0, shift), scale,
                          x, base + off, weight, off, dist), False


@inline
def group_fit(x, base, weight, off, point, shift, factor, coords, sumqx, sumq2):
    """sumqx, sumq2 plus the group's sum(w * q * x), sum(w * q^2), q = its point's level values
    times factor."""
    for i in range(8):
        q = level_value((coords[point, i] - 1) // 2, shift) * factor
        sumqx += weight[off + i] * q * x[base + off + i]
        sumq2 += weight[off + i] * q * q
    return sumqx, sumq2


@inline
def block_max(x, base, n):
    """max |x| over the block at base."""
    top = abs(x[base])
    for i in range(1, n):
        top = top if top > abs(x[base + i]) else abs(x[base + i])
    return top


@inline
def scan_splits(qx, q2, choices, i1, n, best_score, scale, best):
    """ggml's running best fit over the splits (i1, i2), i2 = i1..n, each with `choices` candidates
    (sums qx[c, i2], q2[c, i2]), in its order: `best` holds (i1, i2, c) of the best so far. The row is
    skipped when none of it beats the best on entry: until one does, the best stays as it is."""
    beats = 0
    for c in range(choices):
        for i2 in range(qx.shape[1]):  # whole rows, to vectorize: columns outside i1..n do not count
            beats += (i2 >= i1) & (i2 <= n) & (q2[c, i2] > 0) & (qx[c, i2] * qx[c, i2] > best_score * q2[c, i2])
    if beats > 0:
        for i2 in range(i1, n + 1):
            for c in range(choices):
                if q2[c, i2] > 0 and qx[c, i2] * qx[c, i2] > best_score * q2[c, i2]:
                    scale = qx[c, i2] / q2[c, i2]
                    best_score = scale * qx[c, i2]
                    best[0], best[1], best[2] = i1, i2, c
    return best_score, scale


@inline
def row_width(n):
    """Columns of a block's split rows (i2 = 0..n), whole vectors: rows are computed whole."""
    return (n // 16 + 1) * 16


@inline
def sorted_prefix_sums(x, base, n, weight, order, halves, px, pw):
    """Sort the block (order), then prefix sums of w*x and w in sorted order, one pair per half block
    when halves (IQ1_M: an element outside the half adds nothing), else in row 0."""
    sort_block(x, base, n, order)
    for h in range(2):
        px[h, 0], pw[h, 0] = 0, 0
    for j in range(n):
        i = order[j]
        h = 1 if halves and i >= n // 2 else 0
        px[h, j + 1] = px[h, j] + weight[i] * x[base + i]
        pw[h, j + 1] = pw[h, j] + weight[i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[1 - h, j + 1] = pw[1 - h, j]


@kernel
def iq1_s(x, qw, cols, out, type_size, coords, index, neighbours, listed_points):
    """50-byte super-blocks: d, the low 8 bits of 32 grid indices, then per 32-block a uint16 of the
    indices' top 3 bits, the 3-bit scale and the shift's sign on top."""
    n = 32
    dist = stack_vec(np.float32)
    weight, order, levels = np.empty(n, np.float32), np.empty(n, np.int32), np.empty(n, np.uint8)
    sumx, sumw = np.zeros((2, row_width(n)), np.float32), np.zeros((2, row_width(n)), np.float32)
    qx, q2 = np.empty((2, row_width(n)), np.float32), np.empty((2, row_width(n)), np.float32)  # by shift (+, -), by i2
    points, scales, shifts = np.empty(4, np.int32), np.empty(8, np.float32), np.empty(8, np.int32)
    best = np.empty(3, np.int64)
    p0, p1, p2 = level_value(0, 1), level_value(1, 1), level_value(2, 1)
    m0, m1, m2 = level_value(0, -1), level_value(1, -1), level_value(2, -1)
    for sb in range(x.shape[0] // QK_K):
        base, pos = sb * QK_K, sb * type_size
        out[pos:pos + type_size] = 0
        sigma2 = super_block_sigma2(x, base, 2)
        max_scale = F32(0)
        for ib in range(8):
            xb = base + n * ib
            scales[ib], shifts[ib] = 0, 1
            block_weights(x, qw, cols, xb, n, sigma2, False, weight)
            top = block_max(x, xb, n)
            if top < F32(1e-12):
                continue
            # Every split of the sorted block into levels 0 | 1 | 2, from the prefix sums.
            sorted_prefix_sums(x, xb, n, weight, order, False, sumx, sumw)
            best_score, scale = -FLT_MAX, top
            best[0], best[1], best[2] = -1, -1, -1
            for i1 in range(n + 1):
                for i2 in range(row_width(n)):
                    ax, bx, cx = sumx[0, i1] - sumx[0, 0], sumx[0, i2] - sumx[0, i1], sumx[0, n] - sumx[0, i2]
                    aw, bw, cw = sumw[0, i1] - sumw[0, 0], sumw[0, i2] - sumw[0, i1], sumw[0, n] - sumw[0, i2]
                    qx[0, i2] = ax * p0 + bx * p1 + cx * p2
                    q2[0, i2] = aw * p0 * p0 + bw * p1 * p1 + cw * p2 * p2
                    qx[1, i2] = ax * m0 + bx * m1 + cx * m2
                    q2[1, i2] = aw * m0 * m0 + bw * m1 * m1 + cw * m2 * m2
                best_score, scale = scan_splits(qx, q2, 2, i1, n, best_score, scale, best)
            if best[2] < 0:
                continue
            shift = 1 - 2 * best[2]
            flip = scale < 0
            if flip:
                scale, shift = -scale, -shift
            assign_levels(order, n, best[0], best[1], flip, levels)
            all_on_grid = True
            for k in range(4):
                points[k], on_grid = group_point(x, xb, weight, levels, 8 * k, scale, shift, index, neighbours,
                                                 listed_points, dist)
                all_on_grid &= on_grid
            if not all_on_grid:
                fx, f2 = F32(0), F32(0)
                for k in range(4):
                    fx, f2 = group_fit(x, xb, weight, 8 * k, points[k], shift, F32(1), coords, fx, f2)
                if fx > 0 and f2 > 0:
                    scale = fx / f2
            h = 0
            for k in range(4):
                out[pos + 2 + 4 * ib + k] = points[k] & 0xFF
                h |= (points[k] >> 8) << (3 * k)
            out[pos + 34 + 2 * ib] = h & 0xFF
            out[pos + 35 + 2 * ib] = h >> 8
            if not scale >= 0:
                raise ValueError(OVERFLOW)
            scales[ib], shifts[ib] = scale, shift
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == 0:
            continue
        d = max_scale / F32(15)
        put_fp16(out, pos, d * F32(1.125))
        inv = F32(1) / d
        for ib in range(8):
            l = max(0, min(7, nearest_int(F32(0.5) * (inv * scales[ib] - F32(1)))))
            out[pos + 35 + 2 * ib] |= (l | (8 if shifts[ib] == -1 else 0)) << 4


@kernel
def iq1_m(x, qw, cols, out, type_size, coords, index, neighbours, listed_points):
    """56-byte super-blocks: the low 8 bits of 32 grid indices, per 16-block a byte of the two
    indices' top 3 bits and shift bits, then four uint16 of 3-bit scales whose top nibbles hold the
    fp16 super-block scale."""
    n = 16
    dist = stack_vec(np.float32)
    weights, order, levels = np.empty(QK_K, np.float32), np.empty(n, np.int32), np.empty(n, np.uint8)
    px, pw = np.zeros((2, row_width(n)), np.float32), np.zeros((2, row_width(n)), np.float32)
    qx, q2 = np.empty((4, row_width(n)), np.float32), np.empty((4, row_width(n)), np.float32)  # by choice, by i2
    points, scales, shifts = np.empty(2, np.int32), np.empty(16, np.float32), np.empty(16, np.int64)
    best = np.empty(3, np.int64)
    p0, p1, p2 = level_value(0, 1), level_value(1, 1), level_value(2, 1)
    m0, m1, m2 = level_value(0, -1), level_value(1, -1), level_value(2, -1)
    cp1, cp2, cm1, cm2 = p0 * p0 - p1 * p1, p1 * p1 - p2 * p2, m0 * m0 - m1 * m1, m1 * m1 - m2 * m2
    for sb in range(x.shape[0] // QK_K):
        base, pos = sb * QK_K, sb * type_size
        out[pos:pos + type_size] = 0
        sigma2 = super_block_sigma2(x, base, 2)
        max_scale = F32(0)
        for ib in range(16):
            xb = base + n * ib
            weight = weights[n * ib:n * (ib + 1)]
            scales[ib], shifts[ib] = 0, 0
            block_weights(x, qw, cols, xb, n, sigma2, False, weight)
            top = block_max(x, xb, n)
            if top < F32(1e-7):
                continue
            # Every split of the sorted block into levels 0 | 1 | 2, for each half's shift, from prefix
            # sums per half: with v[0] - v[1] = v[1] - v[2] = -1, a half's sum(w*x*v) is
            # total*v[2] - px[i1] - px[i2] (ggml's algebra, in its order).
            sorted_prefix_sums(x, xb, n, weight, order, True, px, pw)
            best_score, scale = -FLT_MAX, top
            best[0], best[1], best[2] = -1, -1, -1
            for i1 in range(n + 1):
                for i2 in range(row_width(n)):
                    sx0, sx1 = px[0, i1] + px[0, i2], px[1, i1] + px[1, i2]
                    qx_p0, qx_p1 = px[0, n] * p2 - sx0, px[1, n] * p2 - sx1
                    qx_m0, qx_m1 = px[0, n] * m2 - sx0, px[1, n] * m2 - sx1
                    q2_p0 = pw[0, n] * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
                    q2_p1 = pw[1, n] * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
                    q2_m0 = pw[0, n] * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
                    q2_m1 = pw[1, n] * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
                    qx[0, i2], q2[0, i2] = qx_p0 + qx_p1, q2_p0 + q2_p1
                    qx[1, i2], q2[1, i2] = qx_p0 + qx_m1, q2_p0 + q2_m1
                    qx[2, i2], q2[2, i2] = qx_m0 + qx_p1, q2_m0 + q2_p1
                    qx[3, i2], q2[3, i2] = qx_m0 + qx_m1, q2_m0 + q2_m1
                best_score, scale = scan_splits(qx, q2, 4, i1, n, best_score, scale, best)
            choice = best[2]
            if choice < 0:
                continue
            flip = scale < 0
            if flip:
                scale, choice = -scale, 3 - choice
            assign_levels(order, n, best[0], best[1], flip, levels)
            all_on_grid = True
            for k in range(2):
                points[k], on_grid = group_point(x, xb, weight, levels, 8 * k, scale, half_shift(choice, k), index,
                                                 neighbours, listed_points, dist)
                all_on_grid &= on_grid
            if not all_on_grid:
                fx, f2 = F32(0), F32(0)
                for k in range(2):
                    fx, f2 = group_fit(x, xb, weight, 8 * k, points[k], half_shift(choice, k), F32(1), coords, fx, f2)
                if fx > 0 and f2 > 0:
                    scale = fx / f2
            out[pos + 2 * ib] = points[0] & 0xFF
            out[pos + 2 * ib + 1] = points[1] & 0xFF
            out[pos + 32 + ib] = (points[0] >> 8) | ((points[1] >> 8) << 4)
            if not scale >= 0:
                raise ValueError(OVERFLOW)
            scales[ib], shifts[ib] = scale, choice
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == 0:
            continue
        # The block scales in units of max_scale/15, then the super-block scale refitted to them.
        d = max_scale / F32(15)
        inv = F32(1) / d
        fx, f2 = F32(0), F32(0)
        packed = np.zeros(4, np.int64)
        for ib in range(16):
            l = max(0, min(7, nearest_int(F32(0.5) * (inv * scales[ib] - F32(1)))))
            packed[ib // 4] |= l << (3 * (ib % 4))
            out[pos + 32 + ib] |= SHIFT_MASKS[shifts[ib]]
            for k in range(2):
                point = np.int32(out[pos + 2 * ib + k]) | ((np.int32(out[pos + 32 + ib]) << (8 - 4 * k)) & 0x700)
                fx, f2 = group_fit(x, base, weights, n * ib + 8 * k, point, half_shift(shifts[ib], k),
                                   F32(2 * l + 1), coords, fx, f2)
        if f2 > 0:
            d = fx / f2
        s = np.int64(fp16_bits(d * F32(1.1125)))
        packed[0] |= (s & 0x000F) << 12
        packed[1] |= (s & 0x00F0) << 8
        packed[2] |= (s & 0x0F00) << 4
        packed[3] |= s & 0xF000
        for j in range(4):
            out[pos + 48 + 2 * j] = packed[j] & 0xFF
            out[pos + 49 + 2 * j] = packed[j] >> 8
