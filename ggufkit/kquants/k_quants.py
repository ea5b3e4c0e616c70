"""Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: ggml's 256-element super-block quantizers, compiled.

Like ggml's quantize_q*_K entry points: without an imatrix they run quantize_row_q*_K_ref, with one
quantize_row_q*_K_impl (the imatrix weights the scale searches, times sqrt(sigma2 + x^2) except for
Q6_K, which uses the imatrix alone). The sub-block searches run on LANES sub-blocks at once (two
super-blocks of 8, or one of 16), then each super-block's scales are quantized and its bytes written.
Kernel arguments as in `legacy`.
"""

from __future__ import annotations

import numpy as np

from ggufkit.kquants.jit import (F32, GROUP_MAX_EPS, inline, kernel, lane_mat, lane_vec, nearest_f, nearest_int,
                                 put_fp16)
from ggufkit.kquants.search import (LANES, gather_blocks, make_q3_quants, make_qkx_quants, make_qp_quants,
                                    make_qx_quants)

QK_K = 256


# ---- shared steps -------------------------------------------------------------------------------

@inline
def super_sums(x, first, n, n_sub, sigma2, factor):
    """Per super-block in the group: sigma2 = factor * sum(x^2) / QK_K (summed in order)."""
    for s in range(LANES * n // QK_K):
        base = first * n + s * QK_K
        acc = F32(0)
        if base < n_sub * n:
            for j in range(QK_K):
                acc += x[base + j] * x[base + j]
        sigma2[s] = F32(factor) * acc / F32(QK_K)


@inline
def impl_weights(x, qw, cols, first, n, n_sub, sigma2, xt, wt, sw):
    """The impl paths' weight = qw * sqrtf(sigma2 + x^2) of every lane, and each lane's sum (sw)."""
    per_super = QK_K // n
    for k in range(LANES):
        b = first + k
        s = F32(0)
        for i in range(n):
            if b < n_sub:
                v = xt[i, k]
                wt[i, k] = qw[(b * n + i) % cols] * np.sqrt(sigma2[k // per_super] + v * v)
            else:
                wt[i, k] = 0
            s += wt[i, k]
        sw[k] = s


@inline
def squares(xt, wt):
    n, lanes = xt.shape
    for i in range(n):
        for k in range(lanes):
            wt[i, k] = xt[i, k] * xt[i, k]


@inline
def requantize(x, base, L, k, d, dm, lo, hi):
    """ggml's final pass over a sub-block with the stored (rounded) scale d (and min dm): where
    d != 0, L = MAX(lo, MIN(hi, nearest_int((x + dm)/d))) - lo; where d == 0 the search's L stays."""
    if d == 0:
        return
    for i in range(L.shape[0]):
        L[i, k] = np.uint8(nearest_f((x[base + i] + dm) / d, F32(lo), F32(hi)) - F32(lo))


@inline
def put_2bit(out, pos, L, k0):
    """Per 128 half, byte l holds levels l, l+32, l+64, l+96 at bits 0, 2, 4, 6."""
    n = L.shape[0]
    for h in range(2):
        for l in range(32):
            byte = 0
            for s in range(4):
                e = 128 * h + l + 32 * s
                byte |= (L[e % n, k0 + e // n] & 3) << (2 * s)
            out[pos + 32 * h + l] = byte


@inline
def put_bit_plane(out, pos, L, k0, bit):
    """Byte m holds bit `bit` of element 32*j + m at bit j (Q3_K's hmask, Q5_K's qh)."""
    n = L.shape[0]
    for m in range(32):
        byte = 0
        for j in range(8):
            e = 32 * j + m
            byte |= ((L[e % n, k0 + e // n] >> bit) & 1) << j
        out[pos + m] = byte


@inline
def put_nibbles_64(out, pos, L, k0):
    """Per 64 elements, byte l holds level l & 15 and level l + 32 & 15."""
    n = L.shape[0]
    for c in range(4):
        for l in range(32):
            e = 64 * c + l
            lo = L[e % n, k0 + e // n] & 0x0F
            hi = L[(e + 32) % n, k0 + (e + 32) // n] & 0x0F
            out[pos + 32 * c + l] = lo | (hi << 4)


# ---- Q4_K / Q5_K: 8 sub-blocks of 32, affine, 6-bit scales and mins in 12 bytes --------------------

@inline
def pack_scales_k4(out, pos, ls, lm):
    """ggml's 12 scale bytes from 8 scales and mins, with its byte ops (a value above 63 spills into
    its neighbours exactly as in ggml)."""
    for j in range(8):
        if j < 4:
            out[pos + j] = ls[j] & 0xFF
            out[pos + j + 4] = lm[j] & 0xFF
        else:
            out[pos + j + 4] = ((ls[j] & 0xF) | ((lm[j] & 0xF) << 4)) & 0xFF
            out[pos + j - 4] |= ((ls[j] >> 4) << 6) & 0xFF
            out[pos + j] |= ((lm[j] >> 4) << 6) & 0xFF


@inline
def scale_min_k4(out, pos, j):
    """get_scale_min_k4 from the stored bytes."""
    if j < 4:
        return out[pos + j] & 63, out[pos + j + 4] & 63
    return ((out[pos + j + 4] & 0xF) | ((out[pos + j - 4] >> 6) << 4),
            (out[pos + j + 4] >> 4) | ((out[pos + j] >> 6) << 4))


@kernel(slp=True)
def affine_k4(x, qw, cols, out, nmax, type_size):
    """Q4_K (nmax 15, 144 bytes) and Q5_K (nmax 31, 176 bytes), with or without an imatrix."""
    n_sub = x.shape[0] // 32
    use_qw = qw.shape[0] > 0
    xt, wt = lane_mat(32, np.float32), lane_mat(32, np.float32)
    L = lane_mat(32, np.uint8)
    scale, the_min = lane_vec(np.float32), lane_vec(np.float32)
    sigma2, sw = np.empty(LANES * 32 // QK_K, np.float32), lane_vec(np.float32)
    ls, lm = np.empty(8, np.int64), np.empty(8, np.int64)
    qs, qm = np.empty(8, np.uint8), np.empty(8, np.uint8)
    for first in range(0, n_sub, LANES):
        gather_blocks(x, first, 32, n_sub, xt)
        if use_qw:
            super_sums(x, first, 32, n_sub, sigma2, 2)
            impl_weights(x, qw, cols, first, 32, n_sub, sigma2, xt, wt, sw)
            make_qkx_quants(xt, wt, nmax, -0.9, 0.05, 36, False, L, scale, the_min)
        else:
            for k in range(LANES):  # quantize_row_q4/5_K_ref: av_x + |x|, av_x = sqrtf(sum_x2/32)
                s = F32(0)
                for i in range(32):
                    s += xt[i, k] * xt[i, k]
                av_x = np.sqrt(s / F32(32))
                for i in range(32):
                    wt[i, k] = av_x + abs(xt[i, k])
            if nmax == 15:
                make_qkx_quants(xt, wt, nmax, -1.0, 0.1, 20, False, L, scale, the_min)
            else:
                make_qkx_quants(xt, wt, nmax, -0.5, 0.1, 15, False, L, scale, the_min)
        for k0 in range(0, min(LANES, n_sub - first), 8):
            pos = (first + k0) // 8 * type_size
            if use_qw:
                d = make_qp_quants(scale[k0:k0 + 8], sw[k0:k0 + 8], 63, qs)
                dmin = make_qp_quants(the_min[k0:k0 + 8], sw[k0:k0 + 8], 63, qm)
                for j in range(8):  # only Q5_K's impl caps them
                    ls[j] = min(63, qs[j]) if nmax == 31 else qs[j]
                    lm[j] = min(63, qm[j]) if nmax == 31 else qm[j]
            else:
                max_scale, max_min = F32(0), F32(0)
                for j in range(8):
                    if scale[k0 + j] > max_scale:
                        max_scale = scale[k0 + j]
                    if the_min[k0 + j] > max_min:
                        max_min = the_min[k0 + j]
                inv_scale = F32(63) / max_scale if max_scale > 0 else F32(0)
                inv_min = F32(63) / max_min if max_min > 0 else F32(0)
                for j in range(8):
                    ls[j] = min(63, nearest_int(inv_scale * scale[k0 + j]) & 0xFF)
                    lm[j] = min(63, nearest_int(inv_min * the_min[k0 + j]) & 0xFF)
                d, dmin = max_scale / F32(63), max_min / F32(63)
            d = put_fp16(out, pos, d)
            dmin = put_fp16(out, pos + 2, dmin)
            pack_scales_k4(out, pos + 4, ls, lm)
            for j in range(8):
                sc, m = scale_min_k4(out, pos + 4, j)
                requantize(x, (first + k0 + j) * 32, L, k0 + j, d * F32(sc), dmin * F32(m), 0, nmax)
            if nmax == 31:
                put_bit_plane(out, pos + 16, L[:, k0:k0 + 8], 0, 4)
                put_nibbles_64(out, pos + 48, L[:, k0:k0 + 8], 0)
            else:
                put_nibbles_64(out, pos + 16, L[:, k0:k0 + 8], 0)


# ---- Q6_K: 16 sub-blocks of 16, symmetric, int8 scales ---------------------------------------------

@kernel(slp=True)
def q6_k(x, qw, cols, out, nmax, type_size):
    n_sub = x.shape[0] // 16
    use_qw = qw.shape[0] > 0
    xt, wt = lane_mat(16, np.float32), lane_mat(16, np.float32)
    L = lane_mat(16, np.uint8)
    scale = lane_vec(np.float32)
    q = np.empty(4, np.int64)
    for first in range(0, n_sub, LANES):
        gather_blocks(x, first, 16, n_sub, xt)
        if use_qw:  # the impl path weights by the imatrix alone
            for k in range(LANES):
                for i in range(16):
                    wt[i, k] = qw[((first + k) * 16 + i) % cols]
        else:
            squares(xt, wt)
        make_qx_quants(xt, wt, 32, L, scale)
        pos = first // 16 * type_size
        max_scale, max_abs = F32(0), F32(0)
        for k in range(16):
            if abs(scale[k]) > max_abs:
                max_abs = abs(scale[k])
                max_scale = scale[k]
        if max_abs < GROUP_MAX_EPS:  # ggml zeroes the whole block
            for j in range(type_size):
                out[pos + j] = 0
            continue
        iscale = F32(-128) / max_scale
        d = put_fp16(out, pos + 208, F32(1) / iscale)
        for k in range(16):
            sc = min(127, nearest_int(iscale * scale[k])) & 0xFF
            out[pos + 192 + k] = sc
            requantize(x, (first + k) * 16, L, k, d * F32(sc - 256 if sc > 127 else sc), F32(0), -32, 31)
        for h in range(2):  # per 128: ql bytes l and l+32 hold nibbles of l|l+64 and l+32|l+96
            for l in range(32):
                for s in range(4):
                    e = 128 * h + l + 32 * s
                    q[s] = L[e % 16, e // 16]
                out[pos + 64 * h + l] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
                out[pos + 64 * h + l + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
                out[pos + 128 + 32 * h + l] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)


# ---- Q3_K: 16 sub-blocks of 16, symmetric, 6-bit scales, high bit in hmask --------------------------

@kernel(slp=True)
def q3_k(x, qw, cols, out, nmax, type_size):
    """Runs 16 super-blocks at a time: their sub-block searches (16 sub-blocks in lanes), then, with
    an imatrix, the searches for the scale of their 16 scales (the super-blocks in lanes)."""
    n_sub = x.shape[0] // 16
    n_super = n_sub // 16
    use_qw = qw.shape[0] > 0
    xt, wt = lane_mat(16, np.float32), lane_mat(16, np.float32)
    Ls = np.empty((LANES, 16, LANES), np.uint8)  # per super-block: its sub-blocks' levels
    scales, sws = np.zeros((16, LANES), np.float32), np.zeros((16, LANES), np.float32)  # [j, super-block]
    scale, sigma2, sw = lane_vec(np.float32), np.empty(1, np.float32), lane_vec(np.float32)
    sc_l, sc_d = lane_mat(16, np.uint8), lane_vec(np.float32)
    levels = np.empty(16, np.int64)
    for batch in range(0, n_super, LANES):
        for s in range(min(LANES, n_super - batch)):
            first = (batch + s) * 16
            gather_blocks(x, first, 16, n_sub, xt)
            if use_qw:
                super_sums(x, first, 16, n_sub, sigma2, 2)
                impl_weights(x, qw, cols, first, 16, n_sub, sigma2, xt, wt, sw)
                make_qx_quants(xt, wt, 4, Ls[s], scale)
            else:
                make_q3_quants(xt, 4, Ls[s], scale)
            for j in range(16):
                scales[j, s] = scale[j]
                sws[j, s] = sw[j] if use_qw else F32(0)
        if use_qw:
            make_qx_quants(scales, sws, 32, sc_l, sc_d)
        for s in range(min(LANES, n_super - batch)):
            first = (batch + s) * 16
            pos = (batch + s) * type_size
            L = Ls[s]
            for j in range(12):
                out[pos + 96 + j] = 0
            if use_qw:
                d = sc_d[s]
                for j in range(16):
                    levels[j] = sc_l[j, s]
            else:
                max_scale, amax = F32(0), F32(0)
                for j in range(16):
                    if abs(scales[j, s]) > amax:
                        amax = abs(scales[j, s])
                        max_scale = scales[j, s]
                d = F32(0)
                for j in range(16):
                    levels[j] = 0
                if max_scale != 0:
                    iscale = F32(-32) / max_scale
                    for j in range(16):
                        l8 = nearest_int(iscale * scales[j, s]) & 0xFF  # stored in an int8_t, then clamped
                        levels[j] = max(-32, min(31, l8 - 256 if l8 > 127 else l8)) + 32
                    d = F32(1) / iscale
            for j in range(16):
                l = levels[j]
                if j < 8:
                    out[pos + 96 + j] = l & 0xF
                else:
                    out[pos + 96 + j - 8] |= (l & 0xF) << 4
                out[pos + 96 + 8 + j % 4] |= ((l >> 4) << (2 * (j // 4))) & 0xFF
            d = put_fp16(out, pos + 108, d)
            for j in range(16):
                low = np.int64(out[pos + 96 + j] & 0xF) if j < 8 else np.int64(out[pos + 96 + j - 8] >> 4)
                sc = (low | ((np.int64(out[pos + 104 + j % 4]) >> (2 * (j // 4))) & 3) << 4) - 32
                requantize(x, (first + j) * 16, L, j, d * F32(sc), F32(0), -4, 3)
            put_bit_plane(out, pos, L, 0, 2)
            for i in range(16):
                for k in range(16):
                    L[i, k] &= 3
            put_2bit(out, pos + 32, L, 0)


# ---- Q2_K: 16 sub-blocks of 16, affine, 4-bit scale and min per sub-block ---------------------------

@kernel(slp=True)
def q2_k(x, qw, cols, out, nmax, type_size):
    n_sub = x.shape[0] // 16
    use_qw = qw.shape[0] > 0
    xt, wt = lane_mat(16, np.float32), lane_mat(16, np.float32)
    L = lane_mat(16, np.uint8)
    scale, the_min = lane_vec(np.float32), lane_vec(np.float32)
    sigma2, sw = np.empty(1, np.float32), lane_vec(np.float32)
    ls, lm = np.empty(16, np.uint8), np.empty(16, np.uint8)
    for first in range(0, n_sub, LANES):
        pos = first // 16 * type_size
        gather_blocks(x, first, 16, n_sub, xt)
        if use_qw:
            super_sums(x, first, 16, n_sub, sigma2, 1)
            impl_weights(x, qw, cols, first, 16, n_sub, sigma2, xt, wt, sw)
            make_qkx_quants(xt, wt, 3, -0.9, 0.05, 36, False, L, scale, the_min)
            d = make_qp_quants(scale, sw, 15, ls)
            dmin = make_qp_quants(the_min, sw, 15, lm)
            for j in range(16):
                out[pos + j] = (ls[j] | (lm[j] << 4)) & 0xFF
        else:
            for i in range(16):
                for k in range(LANES):
                    wt[i, k] = abs(xt[i, k])
            make_qkx_quants(xt, wt, 3, -0.5, 0.1, 15, True, L, scale, the_min)
            max_scale, max_min = F32(0), F32(0)
            for j in range(16):
                if scale[j] > max_scale:
                    max_scale = scale[j]
                if the_min[j] > max_min:
                    max_min = the_min[j]
            for j in range(16):
                out[pos + j] = 0
            d, dmin = F32(0), F32(0)
            if max_scale > 0:
                iscale = F32(15) / max_scale
                for j in range(16):
                    out[pos + j] = nearest_int(iscale * scale[j]) & 0xFF
                d = max_scale / F32(15)
            if max_min > 0:
                iscale = F32(15) / max_min
                for j in range(16):
                    out[pos + j] |= (nearest_int(iscale * the_min[j]) << 4) & 0xFF
                dmin = max_min / F32(15)
        d = put_fp16(out, pos + 80, d)
        dmin = put_fp16(out, pos + 82, dmin)
        for j in range(16):
            sc = out[pos + j]
            requantize(x, (first + j) * 16, L, j, d * F32(sc & 0xF), dmin * F32(sc >> 4), 0, 3)
        put_2bit(out, pos + 16, L, 0)
