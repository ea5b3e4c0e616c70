"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: ggml's 32-element block quantizers, compiled.

Like ggml's quantize_q*_* entry points: without an imatrix they run the quantize_row_*_ref
formulas (scale from the block's extremes), with one the quantize_row_*_impl weighted searches.
Q8_0 always uses its ref formula (ggml ignores the imatrix).

A kernel takes the chunk's rows flattened (x: float32 (rows*cols,)), the imatrix (float32 (cols,),
empty for none), the row length and the output bytes (uint8 (rows*row_bytes,)).
"""

from __future__ import annotations

import numpy as np

from ggufkit.kquants.jit import F32, abs_key, c_int8, inline, kernel, lane_mat, lane_vec, put_fp16
from ggufkit.kquants.search import LANES, make_qkx_quants, make_qx_quants

QK = 32
FLT_MAX = np.float32(3.4028234663852886e38)


@inline
def put_nibbles(out, pos, q, k):
    """Levels q[:, k] of a 32-block: element j in the low nibble of byte j, element j+16 in the high one."""
    for j in range(16):
        out[pos + j] = (q[j, k] & 0x0F) | ((q[j + 16, k] & 0x0F) << 4)


@inline
def put_high_bits(out, pos, q, k):
    """Bit 4 of each of the 32 levels as the little-endian uint32 `qh` of Q5 blocks."""
    for b in range(4):
        byte = 0
        for j in range(8):
            byte |= ((q[8 * b + j, k] >> 4) & 1) << j
        out[pos + b] = byte


@inline
def row_sigma2(x, cols, n_rows, sigma2):
    """The legacy impl paths' sigma2 = sum(x^2)/n_per_row of each row, summed in order."""
    for r in range(n_rows):
        s = F32(0)
        for j in range(r * cols, (r + 1) * cols):
            s += x[j] * x[j]
        sigma2[r] = s / F32(cols)


@inline
def gather_weighted(x, qw, cols, sigma2, first, n_blocks, xt, wt):
    """Blocks first..first+LANES-1 into lanes, with ggml's weights qw * sqrtf(sigma2 + x^2); lanes
    past the last block are zero (their results are dropped)."""
    for k in range(LANES):
        b = first + k
        for i in range(QK):
            if b < n_blocks:
                e = b * QK + i
                v = x[e]
                xt[i, k] = v
                wt[i, k] = qw[e % cols] * np.sqrt(sigma2[e // cols] + v * v)
            else:
                xt[i, k] = 0
                wt[i, k] = 0


@kernel
def symmetric_search(x, qw, cols, out, nmax, type_size):
    """Q4_0 (nmax 8) / Q5_0 (nmax 16) with an imatrix: make_qx_quants per block."""
    n_blocks = x.shape[0] // QK
    sigma2 = np.empty(x.shape[0] // cols, np.float32)
    row_sigma2(x, cols, sigma2.shape[0], sigma2)
    xt, wt = lane_mat(QK, np.float32), lane_mat(QK, np.float32)
    L, scale = lane_mat(QK, np.uint8), lane_vec(np.float32)
    for first in range(0, n_blocks, LANES):
        gather_weighted(x, qw, cols, sigma2, first, n_blocks, xt, wt)
        make_qx_quants(xt, wt, nmax, L, scale)
        for k in range(min(LANES, n_blocks - first)):
            pos = (first + k) * type_size
            put_fp16(out, pos, scale[k])
            if nmax == 16:
                put_high_bits(out, pos + 2, L, k)
            put_nibbles(out, pos + type_size - 16, L, k)


@kernel
def affine_search(x, qw, cols, out, nmax, type_size):
    """Q4_1 (nmax 15) / Q5_1 (nmax 31) with an imatrix: make_qkx3_quants per block."""
    n_blocks = x.shape[0] // QK
    sigma2 = np.empty(x.shape[0] // cols, np.float32)
    row_sigma2(x, cols, sigma2.shape[0], sigma2)
    xt, wt = lane_mat(QK, np.float32), lane_mat(QK, np.float32)
    L = lane_mat(QK, np.uint8)
    scale, the_min = lane_vec(np.float32), lane_vec(np.float32)
    for first in range(0, n_blocks, LANES):
        gather_weighted(x, qw, cols, sigma2, first, n_blocks, xt, wt)
        make_qkx_quants(xt, wt, nmax, -0.9, 0.05, 36, False, L, scale, the_min)
        for k in range(min(LANES, n_blocks - first)):
            pos = (first + k) * type_size
            put_fp16(out, pos, scale[k])
            put_fp16(out, pos + 2, -the_min[k])
            if nmax == 31:
                put_high_bits(out, pos + 4, L, k)
            put_nibbles(out, pos + type_size - 16, L, k)


@kernel
def symmetric_ref(x, qw, cols, out, nmax, type_size):
    """quantize_row_q4_0_ref / q5_0_ref: d = max / -nmax, levels MIN(2nmax-1, (int8_t)(x/d + nmax + 0.5))."""
    n_blocks = x.shape[0] // QK
    q = np.empty((QK, 1), np.int64)
    half = F32(nmax) + F32(0.5)
    for b in range(n_blocks):
        base = b * QK
        amax, mx = F32(0), F32(0)
        for j in range(QK):
            v = x[base + j]
            if amax < abs(v):
                amax = abs(v)
                mx = v
        d = mx / F32(-nmax)
        inv = F32(1) / d if d != 0 else F32(0)
        pos = b * type_size
        put_fp16(out, pos, d)
        for j in range(QK):
            q[j, 0] = min(2 * nmax - 1, c_int8(x[base + j] * inv + half)) & 0xFF
        if nmax == 16:
            put_high_bits(out, pos + 2, q, 0)
        put_nibbles(out, pos + type_size - 16, q, 0)


@kernel
def affine_ref(x, qw, cols, out, nmax, type_size):
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min)/nmax, levels (int8_t)((x - min)/d + 0.5)
    (Q4_1 takes MIN(15, .) of it, which Q5_1 does not)."""
    n_blocks = x.shape[0] // QK
    q = np.empty((QK, 1), np.int64)
    for b in range(n_blocks):
        base = b * QK
        mn, mx = FLT_MAX, -FLT_MAX
        for j in range(QK):
            v = x[base + j]
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        d = (mx - mn) / F32(nmax)
        inv = F32(1) / d if d != 0 else F32(0)
        pos = b * type_size
        put_fp16(out, pos, d)
        put_fp16(out, pos + 2, mn)
        for j in range(QK):
            level = c_int8((x[base + j] - mn) * inv + F32(0.5))
            q[j, 0] = (min(15, level) if nmax == 15 else level) & 0xFF
        if nmax == 31:
            put_high_bits(out, pos + 4, q, 0)
        put_nibbles(out, pos + type_size - 16, q, 0)


@kernel
def q8_0(x, qw, cols, out, nmax, type_size):
    """quantize_row_q8_0_ref: d = amax/127, levels roundf(x/d) (half away from zero)."""
    for b in range(x.shape[0] // QK):
        base, pos = b * QK, b * type_size
        top = 0
        for j in range(QK):
            top = max(top, abs_key(x[base + j]))
        d = np.int32(top).view(np.float32) / F32(127)
        inv = F32(1) / d if d != 0 else F32(0)
        put_fp16(out, pos, d)
        for j in range(QK):
            v = x[base + j] * inv
            t = np.trunc(v)
            r = t + (F32(1) if v > 0 else F32(-1)) if abs(v - t) >= F32(0.5) else t
            out[pos + 2 + j] = c_int8(r) & 0xFF


@kernel
def _pack_blocks(d_bits, m_bits, q, out, nmax, type_size):
    for b in range(q.shape[0]):
        pos = b * type_size
        out[pos] = d_bits[b] & 0xFF
        out[pos + 1] = d_bits[b] >> 8
        if nmax == 127:  # Q8_0: the int8 codes as they are
            for j in range(QK):
                out[pos + 2 + j] = q[b, j]
            continue
        if nmax in (15, 31):  # affine: the fp16 min follows d
            out[pos + 2] = m_bits[b] & 0xFF
            out[pos + 3] = m_bits[b] >> 8
        if nmax in (16, 31):
            put_high_bits(out, pos + type_size - 20, q[b].reshape(QK, 1), 0)
        put_nibbles(out, pos + type_size - 16, q[b].reshape(QK, 1), 0)


def pack_blocks(qtype, d_bits: np.ndarray, m_bits: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Legacy blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) from their fields, in the same layout the
    quantizers write: fp16 bits of d and (affine types) m, (n,) uint16, and the 32 stored codes per
    block, (n, 32) uint8 (levels from 0; Q8_0's int8 codes as bytes). Returns (n, type_size) bytes."""
    from ggufkit.kquants.registry import BLOCK_TYPES

    block_type = BLOCK_TYPES[qtype]
    nmax = 127 if block_type.nmax == 0 else block_type.nmax
    n = len(codes)
    out = np.empty(n * block_type.type_size, np.uint8)
    _pack_blocks(np.asarray(d_bits, np.int64), np.asarray(m_bits, np.int64), np.ascontiguousarray(codes, np.uint8),
                 out, nmax, block_type.type_size)
    return out.reshape(n, block_type.type_size)
