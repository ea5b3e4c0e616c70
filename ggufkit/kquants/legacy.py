"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: ggml's 32-element block quantizers.

Like ggml's quantize_q*_* entry points: without an imatrix they run the quantize_row_*_ref
formulas (scale from the block's extremes), with one the quantize_row_*_impl weighted searches.
Q8_0 always uses its ref formula (ggml ignores the imatrix).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufkit.kquants.registry import register
from ggufkit.kquants.search import (block_sum, columns, first_extreme, fp16_bits, inverse_or_zero,
                                    make_qkx3_quants, make_qx_quants, signed_absmax)

QK = 32


def c_byte(f: np.ndarray) -> np.ndarray:
    """C's `(int8_t)f` / `(uint8_t)f` as compiled for x86 (cvttss2si): truncate to int32, keep the
    low byte; out-of-range and NaN give 0x80000000, hence 0 (numpy's cast uses the same instruction)."""
    return f.astype(np.int32).astype(np.uint8)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) levels -> (n, 16) bytes: element j in the low nibble, element j+16 in the high one."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 levels as the little-endian uint32 `qh` of Q5 blocks."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def assemble(rows: np.ndarray, *fields: np.ndarray) -> np.ndarray:
    """Write per-block fields (fp16 as uint16, or uint8 (n_blocks, k)) side by side into rows of bytes."""
    parts = [f.view(np.uint8).reshape(len(f), -1) for f in fields]
    out = np.empty((len(parts[0]), sum(p.shape[1] for p in parts)), np.uint8)
    start = 0
    for p in parts:
        out[:, start:start + p.shape[1]] = p
        start += p.shape[1]
    return out.reshape(rows.shape[0], -1)


def imatrix_weights(rows: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """ggml's weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]), sigma2 = sum(x^2)/n_per_row per row."""
    sq = rows * rows
    sigma2 = block_sum(columns(sq)) / np.float32(rows.shape[1])
    return (imatrix * np.sqrt(sigma2[:, None] + sq)).reshape(-1, QK)


def symmetric_ref(rows: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q4_0_ref / q5_0_ref: d = max / -nmax, levels MIN(2nmax-1, (int8_t)(x/d + nmax + 0.5))."""
    b = rows.reshape(-1, QK)
    d = signed_absmax(b)[0] / np.float32(-nmax)
    inv = inverse_or_zero(d)
    # 1/d overflows for a tiny subnormal d; C's levels are then (int8_t)(inf or NaN) = 0, as NaN gives.
    inv[np.isinf(inv)] = np.nan
    x = b * inv[:, None]
    x += np.float32(nmax + 0.5)
    # |x/d| <= nmax (up to rounding), so x lies in [0, 2nmax + 0.5]: clamping the float before the
    # cast equals C's MIN on the truncated integer, and is cheaper.
    np.minimum(x, np.float32(2 * nmax - 0.5), out=x)
    return fp16_bits(d), c_byte(x)


def affine_ref(rows: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min)/nmax, levels (int)((x - min)/d + 0.5).

    The levels lie in [0, nmax] (x - min <= max - min), or are 0 where 1/d overflows: the ref's
    MIN(15, ...) for Q4_1 never applies."""
    b = rows.reshape(-1, QK)
    mn = first_extreme(b, np.argmin)
    d = (first_extreme(b, np.argmax) - mn) / np.float32(nmax)
    x = b - mn[:, None]
    x *= inverse_or_zero(d)[:, None]
    x += np.float32(0.5)
    return fp16_bits(d), fp16_bits(mn), c_byte(x)


def _symmetric(rows: np.ndarray, nmax: int, imatrix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """fp16 scale bits and codes of Q4_0 (nmax 8) / Q5_0 (nmax 16): ggml's max/-nmax rule without an
    imatrix, its weighted scale search with one."""
    if imatrix is None:
        return symmetric_ref(rows, nmax)
    q, scale = make_qx_quants(rows.reshape(-1, QK), nmax, imatrix_weights(rows, imatrix))
    return fp16_bits(scale), q


@register(T.Q4_0)
def quantize_q4_0(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    d, q = _symmetric(rows, 8, imatrix)
    return assemble(rows, d, pack_nibbles(q))


@register(T.Q5_0)
def quantize_q5_0(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    d, q = _symmetric(rows, 16, imatrix)
    return assemble(rows, d, pack_high_bits(q), pack_nibbles(q))


def affine(rows: np.ndarray, imatrix: np.ndarray | None, nmax: int):
    if imatrix is None:
        return affine_ref(rows, nmax)
    q, scale, the_min = make_qkx3_quants(rows.reshape(-1, QK), nmax, imatrix_weights(rows, imatrix),
                                         -0.9, 0.05, 36)
    return fp16_bits(scale), fp16_bits(-the_min), q


@register(T.Q4_1)
def quantize_q4_1(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    d, m, q = affine(rows, imatrix, 15)
    return assemble(rows, d, m, pack_nibbles(q))


@register(T.Q5_1)
def quantize_q5_1(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    d, m, q = affine(rows, imatrix, 31)
    return assemble(rows, d, m, pack_high_bits(q), pack_nibbles(q))


def c_roundf(f: np.ndarray) -> np.ndarray:
    """roundf in place: half away from zero (np.rint rounds half to even). x - trunc(x) is exact."""
    t = np.trunc(f)
    f -= t
    f *= np.float32(2)
    np.trunc(f, out=f)
    f += t
    return f


@register(T.Q8_0)
def quantize_q8_0(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    b = rows.reshape(-1, QK)
    d = signed_absmax(b)[1] / np.float32(127)
    q = c_byte(c_roundf(b * inverse_or_zero(d)[:, None]))
    return assemble(rows, fp16_bits(d), q)
