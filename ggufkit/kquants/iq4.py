"""IQ4_NL and IQ4_XS: ggml's quantize_row_iq4_nl_impl (ntry = 7, as in quantize_iq4_nl/_xs), with
levels on the non-linear grid kvalues_iq4nl."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufkit.kquants.legacy import assemble, pack_nibbles
from ggufkit.kquants.registry import register
from ggufkit.kquants.search import (GROUP_MAX_EPS, block_sum, columns, fp16_bits, inverse_or_zero,
                                    nearest_int, signed_absmax)

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
NTRY = 7
QK = 32
QK_K = 256


def _index_table() -> np.ndarray:
    """best_index_int8 as a table over c = ceil(-2*v), c in [-256, 255] (stored at c mod 512).

    ggml picks between neighbours a <= v < b by float32 `v - a < b - v`. Near the midpoint both
    differences are exact (|v| >= 4.5 there, gaps <= 24), so that equals v < (a+b)/2; away from it
    rounding cannot flip the comparison. Midpoints are multiples of 1/2, hence the index only depends
    on ceil(-2v): index = #{k : ceil(-2v) <= -(a_k + b_k)}.
    """
    c = np.arange(512)
    c = np.where(c < 256, c, c - 512)
    bounds = -(KVALUES[:-1].astype(np.int32) + KVALUES[1:])
    return (c[:, None] <= bounds[None, :]).sum(axis=1).astype(np.uint8)


INDEX = _index_table()
VALUE = KVALUES.astype(np.float32)[INDEX]


def grid_index(x: np.ndarray, inv_scale: np.ndarray) -> np.ndarray:
    """Per element, the intp table position of best_index_int8(16, kvalues, inv_scale*x).

    -2*(inv_scale*x) is computed exactly as (-2*inv_scale)*x. NaN lands on index 15 like in ggml
    (fmax drops it to the bound meaning v >= 128), +-inf on the end they belong to."""
    y = x * (np.float32(-2) * inv_scale)
    np.ceil(y, out=y)
    np.fmax(y, np.float32(-256), out=y)
    np.fmin(y, np.float32(255), out=y)
    return y.astype(np.intp)


def block_scales(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The per-32-block scale of quantize_row_iq4_nl_impl: ntry search of d over the grid."""
    xt, wt = columns(blocks), columns(weights)
    mx, amax = signed_absmax(xt, axis=0)

    def sums(inv_scale):
        q = VALUE.take(grid_index(xt, inv_scale))
        wq = wt * q  # ggml: w*q*x = (w*q)*x and w*q*q = (w*q)*q
        return block_sum(wq * xt), block_sum(wq * q)

    sumqx, sumq2 = sums(np.float32(1) / (-mx / np.float32(KVALUES[0])))
    d = np.where(sumq2 > 0, sumqx / sumq2, np.float32(0))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums(np.float32(itry + int(KVALUES[0])) / mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    return np.where(amax < GROUP_MAX_EPS, np.float32(0), d)


def weights_for(blocks: np.ndarray, super_block: int, qw: np.ndarray | None) -> np.ndarray:
    """x^2 without an imatrix; qw * sqrt(sigma2 + x^2) with one, sigma2 = 2*sum(x^2)/super_block."""
    sq = blocks * blocks
    if qw is None:
        return sq
    per_super = sq.reshape(-1, super_block)
    sigma2 = block_sum(columns(per_super)) * np.float32(2 / super_block)
    return (qw.reshape(-1, super_block) * np.sqrt(sigma2[:, None] + per_super)).reshape(-1, QK)


@register(T.IQ4_NL)
def quantize_iq4_nl(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    b = rows.reshape(-1, QK)
    qw = None if imatrix is None else np.broadcast_to(imatrix, rows.shape)
    d = block_scales(b, weights_for(b, QK, qw))
    L = INDEX.take(grid_index(b, inverse_or_zero(d)[:, None]))
    return assemble(rows, fp16_bits(d), pack_nibbles(L))


@register(T.IQ4_XS)
def quantize_iq4_xs(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    b = rows.reshape(-1, QK)
    qw = None if imatrix is None else np.broadcast_to(imatrix, rows.shape)
    scales = block_scales(b, weights_for(b, QK_K, qw)).reshape(-1, QK_K // QK)
    # ggml's `fabsf(d) > amax_scale` never picks a NaN scale: treat NaN as 0.
    max_scale = signed_absmax(np.where(np.isnan(scales), np.float32(0), scales))[0]
    d = -max_scale / np.float32(32)
    ls = np.clip(nearest_int(inverse_or_zero(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * ls.astype(np.float32)
    L = INDEX.take(grid_index(b, inverse_or_zero(dl).reshape(-1, 1)))
    ls = (ls + 32).astype(np.uint8)
    scales_l = (ls[:, 0::2] & 0x0F) | (ls[:, 1::2] << 4)
    scales_h = ((ls.astype(np.uint16) >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    qs = pack_nibbles(L.reshape(-1, QK)).reshape(len(d), -1)
    return assemble(rows, fp16_bits(d), scales_h.astype("<u2"), scales_l, qs)
