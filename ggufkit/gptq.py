"""Error feedback in the block layout (GPTQ, LDLQ): quantize a weight matrix one quantization block
of columns at a time, and push each block's rounding error onto the columns not yet quantized, so
that the layer's output on the calibration inputs (H = sum of x x^T) changes as little as possible.

With H^-1 = U^T U (U upper triangular), the error D of a column block g, once the later columns
absorb it optimally, costs |D U_gg^-1|^2 and moves the later columns by -(D U_gg^-1) U_g,later.
Inside a block: ggml's own search (kquants) chooses the block's scales from the updated weights,
weighted per column by diag((U_gg^T U_gg)^-1) (that block's cost; for a diagonal H, H's diagonal,
i.e. the imatrix); then its columns are rounded one at a time on those scales' grids, each column's
error pushed onto the block's later columns, and ggml's search fits the block's final scales and
codes to the result. The error that moves the later blocks is the final codes' own. Rows are
independent, so any row chunk of a matrix can be quantized on its own with the same `Feedback`.

Stock types and blocks only: the output is ordinary GGUF data for the type."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggufkit.errors import GgufkitError
from ggufkit.gguffile.hessian import Hessian
from ggufkit.gguffile.imatrix import Imatrix
from ggufkit.kquants import dequantize, quantize
from ggufkit.kquants.jit import kernel

# How a calibrated quantization rounds: "gptq" with error feedback wherever the imatrix carries the
# input Hessians (others as ggml), "ggml" as llama-quantize does with the imatrix (the same bytes).
METHODS = ("gptq", "ggml")
DEFAULT_METHOD = "gptq"

# GPTQ's damping: a fraction of H's mean diagonal added to the diagonal, so that H^-1 exists and the
# feedback does not chase directions the calibration text barely excites.
DAMP = 0.01
# H's off-diagonal part is scaled by 1 - SHRINK. The correlations between input channels are the
# calibration text's; another text has others. On SmolLM2 (Q4_K_M types, Pride and Prejudice), the
# layer output error vs ggml's rounding was 0.30x / 0.42x / 1.17x on the calibration text / another
# novel / Python source with the full H, and 0.38x / 0.45x / 0.86x with SHRINK 0.5.
SHRINK = 0.5


# Where each type keeps its element codes inside a block: (byte ranges to clear, i.e. every code 0;
# byte ranges then set to a pattern that makes every code 1 (8 for the IQ4 types, whose level 8 is
# 1 x the block scale); the codes' range). A block's bytes with all codes 0 and all codes 1,
# dequantized, give each element's grid, offset + step * code (step * kvalues[code] for IQ4): what
# rounding inside a block needs, with the block's scales as ggml's search chose them.
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
Q = GGMLQuantizationType
IQ4_TYPES = (Q.IQ4_NL, Q.IQ4_XS)
CODES: dict[GGMLQuantizationType, tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int, int], ...], int, int]] = {
    Q.Q4_0: (((2, 18),), ((2, 18, 0x11),), 0, 15),
    Q.Q4_1: (((4, 20),), ((4, 20, 0x11),), 0, 15),
    Q.Q5_0: (((2, 22),), ((6, 22, 0x11),), 0, 31),
    Q.Q5_1: (((4, 24),), ((8, 24, 0x11),), 0, 31),
    Q.Q8_0: (((2, 34),), ((2, 34, 0x01),), -128, 127),
    Q.Q2_K: (((16, 80),), ((16, 80, 0x55),), 0, 3),
    Q.Q3_K: (((0, 96),), ((32, 96, 0x55),), 0, 7),
    Q.Q4_K: (((16, 144),), ((16, 144, 0x11),), 0, 15),
    Q.Q5_K: (((16, 176),), ((48, 176, 0x11),), 0, 31),
    Q.Q6_K: (((0, 192),), ((0, 128, 0x11),), 0, 63),
    Q.IQ4_NL: (((2, 18),), ((2, 18, 0x88),), 0, 15),
    Q.IQ4_XS: (((8, 136),), ((8, 136, 0x88),), 0, 15),
}


def element_grids(q: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """Per element of the quantized rows `q`: (offset, step) of its grid under the block's scales."""
    clear, unit, _, _ = CODES[qtype]
    size = GGML_QUANT_SIZES[qtype][1]
    blocks = q.reshape(q.shape[0], -1, size)
    zero = blocks.copy()
    for a, b in clear:
        zero[:, :, a:b] = 0
    ones = zero.copy()
    for a, b, pattern in unit:
        ones[:, :, a:b] = pattern
    both = dequantize(np.concatenate([zero, ones]).reshape(2 * q.shape[0], q.shape[1]), qtype)
    offset, ones = both[:q.shape[0]], both[q.shape[0]:]
    if qtype in IQ4_TYPES:  # levels are multiples of the block scale, which code 8 gives
        return np.zeros_like(ones), ones
    return offset, ones - offset


@kernel
def _round_columns(w, offset, step, u, lo, hi, levels):
    """Each row's columns rounded one at a time to the nearest point of their grids (offset + step *
    code, codes lo..hi; or step * levels when `levels` is not empty), each column's error divided by
    U_ii and pushed onto the row's later columns through U's row i: GPTQ's inner loop, per row, since
    rows are independent. `w` is overwritten with the updated values."""
    rows, cols = w.shape
    out = np.empty_like(w)
    for r in range(rows):
        for i in range(cols):
            x = w[r, i]
            s = step[r, i]
            if levels.size:
                best = levels[0] * s
                for level in levels[1:]:
                    if abs(level * s - x) < abs(best - x):
                        best = level * s
                q = best
            else:
                code = np.rint((x - offset[r, i]) / (s if s != 0 else np.float32(1)))
                q = offset[r, i] + s * min(max(code, lo), hi)
            out[r, i] = q
            err = (x - q) / u[i, i]
            for j in range(i + 1, cols):
                w[r, j] -= err * u[i, j]
    return out


_NO_LEVELS = np.zeros(0, np.float32)


def inverse_factor(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, U^-1) with U upper triangular and H^-1 = U^T U, from one Cholesky factorization of H with
    its rows and columns reversed (P H P = L L^T gives U = P L^-1 P, U^-1 = P L P), instead of
    inverting H and factoring the inverse: 0.17 s against 0.46 s for a 1536-wide H on one core."""
    lower = np.linalg.cholesky(h[::-1, ::-1])
    return _lower_inverse(lower)[::-1, ::-1], lower[::-1, ::-1]


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0],
    [-D^-1 C A^-1, D^-1]] (matrix products, where a general inverse would factor it again)."""
    n = len(lower)
    if n <= 64:
        return np.tril(np.linalg.inv(lower))  # (LU leaves roundoff above the diagonal)
    k = n // 2
    a, d = _lower_inverse(lower[:k, :k]), _lower_inverse(lower[k:, k:])
    out = np.zeros_like(lower)
    out[:k, :k], out[k:, k:] = a, d
    out[k:, :k] = -(d @ lower[k:, :k]) @ a
    return out


def fed_within(x: np.ndarray, offset: np.ndarray, step: np.ndarray, u_gg: np.ndarray,
               qtype: GGMLQuantizationType) -> np.ndarray:
    """The columns of `x` (rows, block) rounded one at a time onto their elements' grids (offset,
    step: `element_grids`), each column's error pushed onto the later ones through U_gg."""
    _, _, lo, hi = CODES[qtype]
    return _round_columns(np.array(x, dtype=np.float32, copy=True), offset, step, u_gg, np.float32(lo),
                          np.float32(hi), IQ4_LEVELS if qtype in IQ4_TYPES else _NO_LEVELS)


class Feedback:
    """U's blocks for one H (n_blocks, width, width) and one quantization block size, computed once
    and used for every row chunk of every weight that reads this input."""

    def __init__(self, h: np.ndarray, block: int, damp: float = DAMP, shrink: float = SHRINK):
        n_blocks, width, _ = h.shape
        if width % block:
            raise ValueError(f"H blocks of width {width} do not split into quantization blocks of {block}")
        self.width, self.block = width, block
        self.groups = [self._groups(hb, block, damp, shrink) for hb in h]

    @staticmethod
    def _groups(h: np.ndarray, block: int, damp: float,
                shrink: float) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(start, U_gg, U_gg^-1, the rounding weights, U_g,later) for each column block g of one H block."""
        diag = np.diagonal(h).astype(np.float64)
        h = h.astype(np.float64) * (1 - shrink)
        dead = diag <= 0  # inputs the calibration never excited: any value is as good
        live_mean = diag[~dead].mean() if (~dead).any() else 1.0
        idx = np.arange(len(h))
        h[dead, :] = 0
        h[:, dead] = 0
        h[idx, idx] = np.where(dead, live_mean, diag) + damp * live_mean
        u, u_inverse = inverse_factor(h)
        groups = []
        for a in range(0, len(h), block):
            b = a + block
            u_inv = u_inverse[a:b, a:b]  # a triangular matrix's diagonal blocks invert as blocks
            weights = np.einsum("ij,ij->i", u_inv, u_inv)  # diag(U_gg^-1 U_gg^-T)
            groups.append((a, np.ascontiguousarray(u[a:b, a:b], dtype=np.float32), u_inv.astype(np.float32),
                           (weights / weights.mean()).astype(np.float32),
                           np.ascontiguousarray(u[a:b, b:], dtype=np.float32)))
        return groups

    def quantize(self, x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        """Rows (rows, cols) of a weight whose input has this H -> GGUF bytes (rows, bytes_per_row)."""
        x = np.array(x, dtype=np.float32, copy=True)
        if x.shape[1] != self.width * len(self.groups):
            raise ValueError(f"rows of {x.shape[1]} columns for an H of {self.width * len(self.groups)}")
        out = []
        for k, groups in enumerate(self.groups):
            base = k * self.width
            for a, u_gg, u_inv, weights, u_later in groups:
                cols = slice(base + a, base + a + self.block)
                q = quantize(x[:, cols], qtype, weights)
                if qtype in CODES:
                    q = quantize(self._fed_within(x[:, cols], q, u_gg, qtype), qtype, weights)
                err = (x[:, cols] - dequantize(q, qtype)) @ u_inv
                if u_later.shape[1]:
                    x[:, base + a + self.block:base + self.width] -= err @ u_later
                out.append(q)
        return np.concatenate(out, axis=1)

    @staticmethod
    def _fed_within(x: np.ndarray, q: np.ndarray, u_gg: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        """The block's columns rounded one at a time on the grids of its first quantization `q`, each
        column's error pushed onto the block's later columns: the values ggml's search then fits."""
        return fed_within(x, *element_grids(q, qtype), u_gg, qtype)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise GgufkitError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")


def model_feedback(imatrix: Imatrix | None, method: str) -> ModelFeedback | None:
    """Error feedback for the weights `imatrix` has Hessians of, under `method` (None: none)."""
    check_method(method)
    if method == "ggml" or imatrix is None or imatrix.hessian is None:
        return None
    return ModelFeedback(imatrix.hessian)


class ModelFeedback:
    """`Feedback` for each weight of a model from its collected input Hessians, built on first use and
    kept for the few most recent inputs (weights sharing an input are written one after another)."""

    KEEP = 4

    def __init__(self, hessian: Hessian, damp: float = DAMP, shrink: float = SHRINK):
        self.hessian, self.damp, self.shrink = hessian, damp, shrink
        self._recent: dict[tuple[str, int], Feedback] = {}

    def for_weight(self, name: str, qtype: GGMLQuantizationType) -> Feedback | None:
        """None where the weight has no H (experts, norms) or its H blocks do not fit the type's."""
        h = self.hessian.of(name)
        block = GGML_QUANT_SIZES[qtype][0]
        if h is None or block <= 1 or h.shape[-1] % block:
            return None
        key = (self.hessian.shares[name], block)
        if key not in self._recent:
            if len(self._recent) >= self.KEEP:
                del self._recent[next(iter(self._recent))]
            self._recent[key] = Feedback(h, block, self.damp, self.shrink)
        return self._recent[key]
