"""MXFP4: ggml's quantize_row_mxfp4_ref compiled. A 32-element block stores a shared E8M0 exponent e
and per element the index of the nearest of the FP4 (E2M1) values, doubled, times d = 2^(e-128);
ggml ignores the imatrix. Kernel arguments as in `legacy`."""

from __future__ import annotations

import math

import numpy as np

from ggufkit.kquants.jit import F32, c_int8, inline, kernel, lane_mat, lane_vec

# kvalues_mxfp4 is 0, 1, 2, 3, 4, 6, 8, 12 at indices 0..7 and their negatives at 8..15. ggml's
# best_index_mxfp4 takes the first index of least float |kvalue*d - x|. A level of the other sign
# than x, or -0, is never strictly nearer than 0; between neighbouring magnitudes both errors are
# exact (Sterbenz; below d/2 the error to d rounds to at least d/2), and farther ones are at least d
# worse. So the index is the number of midpoints m*d (exact: d is a power of two) strictly below |x|,
# plus 8 for a negative x off level 0; a level whose kvalue*d overflows has error inf and is never
# taken, so the midpoint below it does not count.
MIDPOINTS = np.array([0.5, 1.5, 2.5, 3.5, 5, 7, 10], np.float32)
UPPER_LEVELS = np.array([1, 2, 3, 4, 6, 8, 12], np.float32)
QK = 32


@inline
def shared_exponent(xb):
    """The E8M0 exponent e of a block and d = GGML_E8M0_TO_FP32_HALF(e) = 2^(e-128)."""
    amax = F32(0)
    for h in range(2):
        for j in range(16):
            amax = abs(xb[h, j]) if amax < abs(xb[h, j]) else amax
    # floorf(log2f(amax)) through libm's log2f, as ggml: it rounds amax just below 2^n up to n. C's
    # (uint8_t) of a float keeps the low byte of its int32 truncation (amax below 2^-125 wraps).
    e = c_int8(np.floor(math.log2(amax)) - F32(2) + F32(127)) & 0xFF if amax > 0 else 0
    bits = np.uint32(0x00200000) << e if e < 2 else np.uint32(e - 1) << 23
    return e, np.uint32(bits).view(np.float32)


@kernel
def mxfp4(x, qw, cols, out, nmax, type_size):
    """17-byte blocks: e, then 16 bytes holding element j's index in the low nibble and j+16's in the
    high one. A block is copied into (2, 16) halves on the stack, one byte vector of output each: the
    compiler then vectorizes over them (reading x directly it did not)."""
    xb, q = lane_mat(2, np.float32), lane_mat(2, np.int32)
    thresholds = lane_vec(np.float32)
    for b in range(x.shape[0] // QK):
        base, pos = b * QK, b * type_size
        for h in range(2):
            for j in range(16):
                xb[h, j] = x[base + 16 * h + j]
        e, d = shared_exponent(xb)
        out[pos] = e
        for m in range(MIDPOINTS.shape[0]):
            thresholds[m] = MIDPOINTS[m] * d if UPPER_LEVELS[m] * d < np.inf else np.inf
        for h in range(2):
            for j in range(16):
                a = abs(xb[h, j])
                idx = 0
                for m in range(MIDPOINTS.shape[0]):
                    idx += a > thresholds[m]
                q[h, j] = idx + 8 if xb[h, j] < 0 and idx > 0 else idx
        for j in range(16):
            out[pos + 1 + j] = q[0, j] | (q[1, j] << 4)
