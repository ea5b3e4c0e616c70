"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: ggml's 32-element block quantizers, compiled.

Like ggml's quantize_q*_* entry points: without an imatrix they run the quantize_row_*_ref
formulas (scale from the block's extremes), with one the quantize_row_*_impl weighted searches.
Q8_0 always uses its ref formula (ggml ignores the imatrix).

A kernel takes the chunk's rows flattened (x: float32 (rows*cols,)), the imatrix (float32 (cols,),
empty for none), the row length and the output bytes (uint8 (rows*row_bytes,)).
"""

from __future__ import annotations

import numpy as np

from ggufkit.kquants.jit import (F32, abs_key, block_vec, c_int8, inline, kernel, lane_mat, lane_vec, put_fp16,
                                 tree_max)
from ggufkit.kquants.search import LANES, make_qkx_quants, make_qx_quants

QK = 32


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


@kernel(slp=True)
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


@kernel(slp=True)
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


@inline
def put_levels(out, pos, q, nmax, type_size):
    """A ref kernel's 32 levels (q: (32,) uint8) into its block at out[pos:]: Q5's fifth bits before
    the nibbles, which end the block."""
    if nmax == 16 or nmax == 31:
        for b in range(4):
            byte = np.uint8(0)
            for j in range(8):
                byte |= ((q[8 * b + j] >> 4) & 1) << j
            out[pos + type_size - 20 + b] = byte
    nibbles = out[pos + type_size - 16:pos + type_size]  # a slice: indices known >= 0, no wraparound checks
    for j in range(16):
        nibbles[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)


@inline
def pairwise_extremes(xb, low, high):
    """min and max of a 32-block as ggml's element loop finds them (strict `<`, `>`: the first of
    equal values stays, which decides between -0.0 and 0.0), in a tree of adjacent pairs whose
    left member always holds the lower indices: straight-line vector code with `slp`."""
    for i in range(16):
        a, c = xb[2 * i], xb[2 * i + 1]
        low[i] = a if a <= c else c
        high[i] = a if a >= c else c
    for width in (8, 4, 2, 1):
        for i in range(width):
            a, c = low[2 * i], low[2 * i + 1]
            low[i] = a if a <= c else c
            a, c = high[2 * i], high[2 * i + 1]
            high[i] = a if a >= c else c
    return low[0], high[0]


# The ref formulas keep the first element to reach a block's extreme (ggml's strict `<` and `>`
# in an element loop). Q4_0's keys carry 31 - j below |x|'s bits, so one max over them finds the
# extreme and the first index reaching it, in any order of comparisons (tree_max); Q4_1's extremes
# come from pairwise_extremes.
# Levels: (int8_t)f in ggml. Where 1/d is finite, f lies between 0 and just above the top level
# (every x lies between the extremes): a plain conversion. A subnormal d makes 1/d infinite and every
# f inf or NaN, which x86 converts to 0x80000000, level 0: so 1/d and the offset become 0 (a select
# per block; a branch around the element loops made the kernel 3x slower).


def symmetric_ref(nmax: int, type_size: int):
    """quantize_row_q4_0_ref / q5_0_ref: d = max / -nmax, levels MIN(2nmax-1, (int8_t)(x/d + nmax + 0.5))."""

    @kernel(slp=True)
    def ref(x, qw, cols, out, _nmax, _type_size):
        key, q = block_vec(np.int64), block_vec(np.uint8)
        half = F32(nmax) + F32(0.5)
        top_level = np.int32(2 * nmax - 1)
        for b in range(x.shape[0] // QK):
            xb = x[b * QK:(b + 1) * QK]
            for j in range(QK):
                key[j] = (np.int64(abs_key(xb[j])) << 5) | (31 - j)
            top = tree_max(key)
            mx = xb[31 - (top & 31)] if top >= 32 else F32(0)  # ggml's max starts at 0.0f: all zeros keep it
            d = mx / F32(-nmax)
            inv = F32(1) / d if d != 0 else F32(0)
            put_fp16(out, b * type_size, d)
            inv, offset = (inv, half) if abs(inv) < np.inf else (F32(0), F32(0))
            for j in range(QK):
                q[j] = min(top_level, np.int32(xb[j] * inv + offset))
            put_levels(out, b * type_size, q, nmax, type_size)

    return ref


def affine_ref(nmax: int, type_size: int):
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min)/nmax, levels (int8_t)((x - min)/d + 0.5)
    (Q4_1 takes MIN(15, .) of it, which Q5_1 does not)."""

    @kernel(slp=True)
    def ref(x, qw, cols, out, _nmax, _type_size):
        low, high, q = block_vec(np.float32), block_vec(np.float32), block_vec(np.uint8)
        cap = np.int32(15 if nmax == 15 else 255)
        for b in range(x.shape[0] // QK):
            xb = x[b * QK:(b + 1) * QK]
            mn, mx = pairwise_extremes(xb, low, high)
            d = (mx - mn) / F32(nmax)
            inv = F32(1) / d if d != 0 else F32(0)
            put_fp16(out, b * type_size, d)
            put_fp16(out, b * type_size + 2, mn)
            inv, offset = (inv, F32(0.5)) if abs(inv) < np.inf else (F32(0), F32(0))
            for j in range(QK):
                q[j] = min(cap, np.int32((xb[j] - mn) * inv + offset))
            put_levels(out, b * type_size, q, nmax, type_size)

    return ref


# One kernel per type, its constants fixed when compiled: with nmax a run-time value, the compiler
# kept one loop for both layouts and Q5_0 took 4x Q4_0's time.
q4_0_ref, q5_0_ref = symmetric_ref(8, 18), symmetric_ref(16, 22)
q4_1_ref, q5_1_ref = affine_ref(15, 20), affine_ref(31, 24)


@kernel(slp=True)
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
