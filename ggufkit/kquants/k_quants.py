"""Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: ggml's 256-element super-block quantizers.

Like ggml's quantize_q*_K entry points: without an imatrix they run quantize_row_q*_K_ref, with one
quantize_row_q*_K_impl (the imatrix weights the scale searches, times sqrt(sigma2 + x^2) except for
Q6_K, which uses the imatrix alone). Every function works on all super-blocks of a chunk at once.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufkit.kquants.legacy import assemble
from ggufkit.kquants.registry import register
from ggufkit.kquants.search import (GROUP_MAX_EPS, block_sum, columns, fp16_bits, make_q3_quants,
                                    make_qkx2_quants, make_qkx3_quants, make_qp_quants, make_qx_quants,
                                    nearest_int, nearest_level, signed_absmax)

QK_K = 256


# ---- shared steps -------------------------------------------------------------------------------

def fp16_value(bits: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of the stored half: the value the final pass divides by."""
    return bits.view(np.float16).astype(np.float32)


def imatrix_per_block(rows: np.ndarray, imatrix: np.ndarray, n: int) -> np.ndarray:
    """The imatrix repeated for every row, cut in blocks of n like the rows."""
    return np.broadcast_to(imatrix, rows.shape).reshape(-1, n)


def sigma2_weights(rows: np.ndarray, imatrix: np.ndarray, n: int, factor: int) -> np.ndarray:
    """The impl paths' weight[l] = qw[l] * sqrtf(sigma2 + x*x), sigma2 = factor*sum(x^2)/QK_K per
    super-block (factor 2 except Q2_K's 1), as (n_blocks, n)."""
    xs = rows.reshape(-1, QK_K)
    sq = xs * xs
    sigma2 = np.float32(factor) * block_sum(columns(sq)) / np.float32(QK_K)
    qw = imatrix_per_block(rows, imatrix, QK_K)
    return (qw * np.sqrt(sigma2[:, None] + sq)).reshape(-1, n)


def sums_per_block(a: np.ndarray) -> np.ndarray:
    """`float s = 0; for (l...) s += a[l];` for each row of a (n_blocks, n)."""
    return block_sum(columns(a))


def positive_max(a: np.ndarray) -> np.ndarray:
    """`float m = 0; if (v > m) m = v;` over axis 1 (NaN and negatives never win)."""
    return np.where(a > 0, a, np.float32(0)).max(axis=1)


def requantize(x: np.ndarray, d: np.ndarray, L: np.ndarray, lo: int, hi: int, dm=None) -> np.ndarray:
    """ggml's final pass over sub-blocks with the stored (rounded) scales: where d != 0,
    L = MAX(lo, MIN(hi, nearest_int((x + dm)/d))) - lo; where d == 0 the search's L stays."""
    keep = d == 0
    v = x if dm is None else x + dm[:, None]
    q = nearest_level(v / np.where(keep, np.float32(1), d)[:, None], lo, hi) - np.float32(lo)
    return np.where(keep[:, None], L, q.astype(np.uint8))


def pack_2bit(L: np.ndarray) -> np.ndarray:
    """(n, 256) levels in [0, 3] -> (n, 64): per 128 half, byte l holds L[l + 32k] at bits 2k."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(len(L), -1)


def pack_nibbles_64(L: np.ndarray) -> np.ndarray:
    """(n, 256) levels -> (n, 128): per 64 elements, byte l holds L[l] & 15 and L[l + 32] & 15."""
    q = L.reshape(-1, 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(L), -1)


def pack_bit_planes(bits: np.ndarray) -> np.ndarray:
    """(n, 256) booleans -> (n, 32): byte m holds element 32k + m at bit k (Q3_K's hmask, Q5_K's qh)."""
    return np.packbits(bits.reshape(-1, 8, 32), axis=1, bitorder="little").reshape(len(bits), 32)


# ---- Q4_K / Q5_K: 8 sub-blocks of 32, affine, 6-bit scales and mins in 12 bytes --------------------

def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """ggml's 12-byte scales of Q4_K/Q5_K from uint8 (n, 8) scales and mins, with the same byte ops
    (a value above 63 spills into its neighbours exactly as in ggml)."""
    lo, hi = slice(0, 4), slice(4, 8)
    return np.concatenate([ls[:, lo] | ((ls[:, hi] >> 4) << 6),
                           lm[:, lo] | ((lm[:, hi] >> 4) << 6),
                           (ls[:, hi] & 0x0F) | ((lm[:, hi] & 0x0F) << 4)], axis=1)


def unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: (scales, mins) as uint8 (n, 8)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def ref_weights_k4(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4/5_K_ref's weights av_x + |x|, av_x = sqrtf(sum_x2/32).

    The vendored q5_K source adds the squares twice, but the libggml-base we match (llama-cpp-python
    0.3.36's build) sums them once, then multiplies by 1/32: bytes match ggml only this way."""
    sum_x2 = block_sum(columns(x * x))
    return np.sqrt(sum_x2 / np.float32(32))[:, None] + np.abs(x)


def affine_k4_fields(rows: np.ndarray, imatrix: np.ndarray | None, nmax: int, ref_search):
    """The sub-block search and the scale encoding of Q4_K/Q5_K: (d, dmin, 12-byte scales, L)."""
    x = rows.reshape(-1, 32)
    if imatrix is None:
        rmin, rdelta, nstep = ref_search
        L, scales, mins = make_qkx2_quants(x, nmax, ref_weights_k4(x), rmin, rdelta, nstep, False)
        scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        ls = quantize_to_63(scales, max_scale)
        lm = quantize_to_63(mins, max_min)
        d, dmin = max_scale / np.float32(63), max_min / np.float32(63)
    else:
        weights = sigma2_weights(rows, imatrix, 32, 2)
        sw = sums_per_block(weights).reshape(-1, 8)
        L, scales, mins = make_qkx3_quants(x, nmax, weights, -0.9, 0.05, 36)
        ls, d = make_qp_quants(scales.reshape(-1, 8), 63, sw)
        lm, dmin = make_qp_quants(mins.reshape(-1, 8), 63, sw)
        if nmax == 31:  # only Q5_K's impl caps them (the qp levels never exceed 63 unless wrapped)
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    packed = pack_scales_k4(ls, lm)
    d16, dmin16 = fp16_bits(d), fp16_bits(dmin)
    sc, m = unpack_scales_k4(packed)
    dl = (fp16_value(d16)[:, None] * sc.astype(np.float32)).reshape(-1)
    ml = (fp16_value(dmin16)[:, None] * m.astype(np.float32)).reshape(-1)
    L = requantize(x, dl, L, 0, nmax, ml).reshape(-1, QK_K)
    return d16, dmin16, packed, L


def quantize_to_63(a: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """The ref path's `uint8_t l = nearest_int(inv*a); l = MIN(63, l)`, inv = amax > 0 ? 63/amax : 0."""
    inv = np.where(amax > 0, np.float32(63) / amax, np.float32(0))
    return np.minimum((nearest_int(inv[:, None] * a) & 0xFF).astype(np.uint8), 63)


@register(T.Q4_K)
def quantize_q4_k(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    d, dmin, scales, L = affine_k4_fields(rows, imatrix, 15, (-1.0, 0.1, 20))
    return assemble(rows, d, dmin, scales, pack_nibbles_64(L))


@register(T.Q5_K)
def quantize_q5_k(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    d, dmin, scales, L = affine_k4_fields(rows, imatrix, 31, (-0.5, 0.1, 15))
    return assemble(rows, d, dmin, scales, pack_bit_planes(L > 15), pack_nibbles_64(L))


# ---- Q6_K: 16 sub-blocks of 16, symmetric, int8 scales ---------------------------------------------

@register(T.Q6_K)
def quantize_q6_k(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    x = rows.reshape(-1, 16)
    qw = None if imatrix is None else imatrix_per_block(rows, imatrix, 16)
    L, scales = make_qx_quants(x, 32, qw)
    scales = scales.reshape(-1, 16)
    max_scale, max_abs = signed_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = np.float32(-128) / np.where(zero, np.float32(1), max_scale)
    d16 = fp16_bits(np.where(zero, np.float32(0), np.float32(1) / iscale))
    sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    sc[zero] = 0
    dl = (fp16_value(d16)[:, None] * sc.astype(np.float32)).reshape(-1)
    L = requantize(x, dl, L, -32, 31).reshape(-1, QK_K)
    L[zero] = 0  # ggml memsets the whole block
    q = L.reshape(-1, 2, 4, 32)
    ql = ((q[:, :, 0:2] & 0x0F) | ((q[:, :, 2:4] & 0x0F) << 4)).reshape(len(L), -1)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(len(L), -1)
    return assemble(rows, ql, qh, sc, d16)


# ---- Q3_K: 16 sub-blocks of 16, symmetric, 6-bit scales, high bit in hmask --------------------------

def pack_scales_q3(l: np.ndarray) -> np.ndarray:
    """(n, 16) 6-bit values -> ggml's 12 bytes: low nibbles of j and j+8 in byte j, then the top
    two bits of j at bits 2*(j/4) of byte 8 + j%4."""
    top = (l >> 4).reshape(-1, 4, 4)
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return np.concatenate([(l[:, :8] & 0x0F) | ((l[:, 8:] & 0x0F) << 4), high], axis=1)


def q3_k_scales(rows: np.ndarray, x: np.ndarray, imatrix: np.ndarray | None):
    """Sub-block search and 6-bit scale codes of Q3_K: (levels (n, 16) in [0, 63], d, L)."""
    if imatrix is None:
        L, scales = make_q3_quants(x, 4)
        scales = scales.reshape(-1, 16)
        max_scale = signed_absmax(scales)[0]
        nonzero = max_scale != 0
        iscale = np.float32(-32) / np.where(nonzero, max_scale, np.float32(1))
        l = np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31) + np.int8(32)
        l[~nonzero] = 0  # ggml leaves the scale bytes zero
        d = np.where(nonzero, np.float32(1) / iscale, np.float32(0))
        return l.view(np.uint8), d, L
    weights = sigma2_weights(rows, imatrix, 16, 2)
    L, scales = make_qx_quants(x, 4, weights)
    l, d = make_qx_quants(scales.reshape(-1, 16), 32, sums_per_block(weights).reshape(-1, 16))
    return l, d, L


@register(T.Q3_K)
def quantize_q3_k(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    x = rows.reshape(-1, 16)
    l, d, L = q3_k_scales(rows, x, imatrix)
    d16 = fp16_bits(d)
    dl = (fp16_value(d16)[:, None] * (l.astype(np.float32) - np.float32(32))).reshape(-1)
    L = requantize(x, dl, L, -4, 3).reshape(-1, QK_K)
    high = L > 3
    return assemble(rows, pack_bit_planes(high), pack_2bit(L - (high << 2).astype(np.uint8)),
                    pack_scales_q3(l), d16)


# ---- Q2_K: 16 sub-blocks of 16, affine, 4-bit scale and min per sub-block ---------------------------

def quantize_to_15(a: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """The ref path's nearest_int(15/amax * a) where amax > 0, else 0, as int32 (n, 16)."""
    inv = np.where(amax > 0, np.float32(15) / amax, np.float32(0))
    return np.where((amax > 0)[:, None], nearest_int(inv[:, None] * a), 0)


@register(T.Q2_K)
def quantize_q2_k(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    x = rows.reshape(-1, 16)
    if imatrix is None:
        L, scales, mins = make_qkx2_quants(x, 3, np.abs(x), -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        ls, lm = quantize_to_15(scales, max_scale), quantize_to_15(mins, max_min)
        d, dmin = max_scale / np.float32(15), max_min / np.float32(15)
    else:
        weights = sigma2_weights(rows, imatrix, 16, 1)
        sw = sums_per_block(weights).reshape(-1, 16)
        L, scales, mins = make_qkx3_quants(x, 3, weights, -0.9, 0.05, 36)
        ls, d = make_qp_quants(scales.reshape(-1, 16), 15, sw)
        lm, dmin = make_qp_quants(mins.reshape(-1, 16), 15, sw)
    packed = ((ls.astype(np.int32) & 0xFF) | ((lm.astype(np.int32) << 4) & 0xFF)).astype(np.uint8)
    d16, dmin16 = fp16_bits(d), fp16_bits(dmin)
    dl = (fp16_value(d16)[:, None] * (packed & 0x0F).astype(np.float32)).reshape(-1)
    ml = (fp16_value(dmin16)[:, None] * (packed >> 4).astype(np.float32)).reshape(-1)
    L = requantize(x, dl, L, 0, 3, ml).reshape(-1, QK_K)
    return assemble(rows, packed, pack_2bit(L), d16, dmin16)
