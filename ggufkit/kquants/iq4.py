"""IQ4_NL and IQ4_XS: ggml's quantize_row_iq4_nl_impl (ntry = 7, as in quantize_iq4_nl/_xs), with
levels on the non-linear grid kvalues_iq4nl, compiled. Kernel arguments as in `legacy`."""

from __future__ import annotations

import numpy as np

from ggufkit.kquants.jit import F32, GROUP_MAX_EPS, inline, kernel, lane_mat, lane_vec, nearest_int, put_fp16
from ggufkit.kquants.legacy import put_nibbles
from ggufkit.kquants.search import LANES, signed_absmax

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
# best_index_int8 picks the upper of neighbours a <= v < b when float32 `v - a < b - v` fails. Near
# the midpoint both differences are exact (|v| >= 4.5 there, gaps <= 24), so that is v >= (a+b)/2;
# away from it rounding cannot flip the comparison. So the index is the number of midpoints m with
# !(v < m): a NaN gets 15, as in ggml.
MIDPOINTS = ((KVALUES[:-1].astype(np.float32) + KVALUES[1:].astype(np.float32)) / 2).astype(np.float32)
STEPS = np.diff(KVALUES.astype(np.float32)).astype(np.float32)
NTRY = 7
QK = 32
QK_K = 256


@inline
def grid_index(v):
    """best_index_int8(16, kvalues_iq4nl, v)."""
    idx = 0
    for m in range(15):
        idx += 0 if v < MIDPOINTS[m] else 1
    return idx


@inline
def grid_value(v):
    """kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, v)] as float32, without a table lookup."""
    q = F32(-127)
    for m in range(15):
        q += F32(0) if v < MIDPOINTS[m] else STEPS[m]
    return q


@inline
def _sums(x, w, inv, sumqx, sumq2):
    n, lanes = x.shape[0], LANES
    for k in range(lanes):
        sumqx[k] = 0
        sumq2[k] = 0
    for i in range(n):
        for k in range(lanes):
            q = grid_value(inv[k] * x[i, k])
            wq = w[i, k] * q  # ggml: w*q*x = (w*q)*x and w*q*q = (w*q)*q
            sumqx[k] += wq * x[i, k]
            sumq2[k] += wq * q


@inline
def block_scales(x, w, d):
    """The per-32-block scale of quantize_row_iq4_nl_impl per lane: ntry search of d over the grid."""
    lanes = LANES
    mx, amax = lane_vec(F32), lane_vec(F32)
    signed_absmax(x, mx, amax)
    inv, best = lane_vec(F32), lane_vec(F32)
    sumqx, sumq2 = lane_vec(F32), lane_vec(F32)
    for k in range(lanes):
        inv[k] = F32(1) / (-mx[k] / F32(KVALUES[0]))
    _sums(x, w, inv, sumqx, sumq2)
    for k in range(lanes):
        d[k] = sumqx[k] / sumq2[k] if sumq2[k] > 0 else F32(0)
        best[k] = d[k] * sumqx[k]
    for itry in range(-NTRY, NTRY + 1):
        for k in range(lanes):
            inv[k] = F32(itry + KVALUES[0]) / mx[k]
        _sums(x, w, inv, sumqx, sumq2)
        for k in range(lanes):  # selects, not branches: this loop vectorizes too
            better = (sumq2[k] > 0) & (sumqx[k] * sumqx[k] > best[k] * sumq2[k])
            dk = sumqx[k] / sumq2[k]
            d[k] = dk if better else d[k]
            best[k] = dk * sumqx[k] if better else best[k]
    for k in range(lanes):
        if amax[k] < GROUP_MAX_EPS:
            d[k] = 0


@inline
def gather_weights(x, qw, cols, first, n_blocks, super_block, xt, wt):
    """Blocks into lanes with x^2 weights, or qw * sqrt(sigma2 + x^2), sigma2 = 2*sum(x^2)/super_block
    over each block's super-block (the block itself for IQ4_NL)."""
    use_qw = qw.shape[0] > 0
    for k in range(LANES):
        b = first + k
        sigma2 = F32(0)
        if use_qw and b < n_blocks:
            start = b * QK // super_block * super_block
            for j in range(start, start + super_block):
                sigma2 += x[j] * x[j]
            sigma2 *= F32(2 / super_block)
        for i in range(QK):
            e = b * QK + i
            v = x[e] if b < n_blocks else F32(0)
            xt[i, k] = v
            if b >= n_blocks:
                wt[i, k] = 0
            elif use_qw:
                wt[i, k] = qw[e % cols] * np.sqrt(sigma2 + v * v)
            else:
                wt[i, k] = v * v


@kernel
def iq4_nl(x, qw, cols, out, nmax, type_size):
    n_blocks = x.shape[0] // QK
    xt, wt = lane_mat(QK, np.float32), lane_mat(QK, np.float32)
    d = lane_vec(np.float32)
    L = np.empty((QK, 1), np.uint8)
    for first in range(0, n_blocks, LANES):
        gather_weights(x, qw, cols, first, n_blocks, QK, xt, wt)
        block_scales(xt, wt, d)
        for k in range(min(LANES, n_blocks - first)):
            pos = (first + k) * type_size
            put_fp16(out, pos, d[k])
            inv = F32(1) / d[k] if d[k] != 0 else F32(0)
            for i in range(QK):
                L[i, 0] = grid_index(inv * xt[i, k])
            put_nibbles(out, pos + 2, L, 0)


@kernel
def iq4_xs(x, qw, cols, out, nmax, type_size):
    n_blocks = x.shape[0] // QK
    xt, wt = lane_mat(QK, np.float32), lane_mat(QK, np.float32)
    scales = lane_vec(np.float32)
    L = np.empty((QK, 1), np.uint8)
    for first in range(0, n_blocks, LANES):
        gather_weights(x, qw, cols, first, n_blocks, QK_K, xt, wt)
        block_scales(xt, wt, scales)
        for k0 in range(0, min(LANES, n_blocks - first), 8):
            pos = (first + k0) // 8 * type_size
            max_scale, amax_scale = F32(0), F32(0)
            for j in range(8):
                if abs(scales[k0 + j]) > amax_scale:
                    amax_scale = abs(scales[k0 + j])
                    max_scale = scales[k0 + j]
            d = -max_scale / F32(32)
            put_fp16(out, pos, d)
            inv = F32(1) / d if d != 0 else F32(0)
            scales_h = 0
            for j in range(8):
                l = max(-32, min(31, nearest_int(inv * scales[k0 + j])))
                dl = d * F32(l)
                idl = F32(1) / dl if dl != 0 else F32(0)
                for i in range(QK):
                    L[i, 0] = grid_index(idl * xt[i, k0 + j])
                put_nibbles(out, pos + 8 + 16 * j, L, 0)
                l += 32
                if j % 2 == 0:
                    out[pos + 4 + j // 2] = l & 0xF
                else:
                    out[pos + 4 + j // 2] |= (l & 0xF) << 4
                scales_h |= (l >> 4) << (2 * j)
            out[pos + 2] = scales_h & 0xFF
            out[pos + 3] = scales_h >> 8
