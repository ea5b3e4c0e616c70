"""TQ1_0 and TQ2_0: ggml's ternary types (BitNet b1.58, TriLMs), quantize_row_tq1_0_ref /
quantize_row_tq2_0_ref compiled. Each 256-element block stores d = max|x| as fp16 and every element
as a trit lroundf(x/d) in {-1, 0, 1}; ggml ignores the imatrix. Kernel arguments as in `legacy`."""

from __future__ import annotations

import numpy as np

from ggufkit.kquants.jit import F32, inline, kernel, put_fp16

QK_K = 256


@inline
def scale_and_inverse(x, base):
    """d = max|x| of the block at `base`, and ggml's id = 1/d (0 for d = 0). Where 1/d overflows (d
    below 2^-128), ggml's x*id is inf or NaN and lroundf returns LONG_MIN, whose low 32 bits make the
    level 0: an id of 0 gives the same levels."""
    amax = F32(0)
    for j in range(base, base + QK_K):
        amax = max(amax, abs(x[j]))
    inv = F32(1) / amax if amax != 0 else F32(0)
    return amax, inv if inv < np.inf else F32(0)


@inline
def trit(v):
    """lroundf(v) + 1 for |v| <= 1 + 2^-23 (v = x*id): 0, 1 or 2."""
    return 1 + np.int32(v >= F32(0.5)) - np.int32(v <= F32(-0.5))


@inline
def put_base3(x, base, inv, out, pos, width, digits):
    """quantize_row_tq1_0_ref's packing of `width` bytes: byte m holds the trits of elements
    base + m + n*width (n < digits) as the base-3 number q with the first most significant, padded to
    5 digits, stored as ceil(q * 256 / 243) so that a multiply by 3 shifts the next trit into the top."""
    for m in range(width):
        q = 0
        for n in range(digits):
            q = q * 3 + trit(x[base + m + n * width] * inv)
        for _ in range(digits, 5):
            q *= 3
        out[pos + m] = (q * 256 + 242) // 243


@kernel
def tq1_0(x, qw, cols, out, nmax, type_size):
    """54-byte blocks: qs[48] (5 trits a byte: 32 bytes over elements 0..159, 16 over 160..239),
    qh[4] (4 trits a byte, elements 240..255), d."""
    for b in range(x.shape[0] // QK_K):
        base, pos = b * QK_K, b * type_size
        d, inv = scale_and_inverse(x, base)
        put_base3(x, base, inv, out, pos, 32, 5)
        put_base3(x, base + 160, inv, out, pos + 32, 16, 5)
        put_base3(x, base + 240, inv, out, pos + 48, 4, 4)
        put_fp16(out, pos + 52, d)


@kernel
def tq2_0(x, qw, cols, out, nmax, type_size):
    """66-byte blocks: qs[64] (2 bits a trit: byte 32h + m holds elements 128h + m + 32n at bits 2n),
    d."""
    for b in range(x.shape[0] // QK_K):
        base, pos = b * QK_K, b * type_size
        d, inv = scale_and_inverse(x, base)
        for h in range(2):
            for m in range(32):
                q = 0
                for n in range(4):
                    q |= trit(x[base + 128 * h + m + 32 * n] * inv) << (2 * n)
                out[pos + 32 * h + m] = q
        put_fp16(out, pos + 64, d)
