"""Error feedback in the block layout (GPTQ, LDLQ): quantize a weight matrix one quantization block
of columns at a time, and push each block's rounding error onto the columns not yet quantized, so
that the layer's output on the calibration inputs (H = sum of x x^T) changes as little as possible.

With H^-1 = U^T U (U upper triangular), the error D of a column block g, once the later columns
absorb it optimally, costs |D U_gg^-1|^2 and moves the later columns by -(D U_gg^-1) U_g,later.
The block's scales and codes come from ggml's own search (kquants) on the updated weights, weighted
per column by diag((U_gg^T U_gg)^-1): that block's cost, the imatrix's role in plain rounding (for a
diagonal H it is H's diagonal, i.e. the imatrix). Rows are independent, so any row chunk of a matrix
can be quantized on its own with the same `Feedback`.

Stock types and blocks only: the output is ordinary GGUF data for the type."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggufkit.errors import GgufkitError
from ggufkit.gguffile.hessian import Hessian
from ggufkit.gguffile.imatrix import Imatrix
from ggufkit.kquants import dequantize, quantize

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
                shrink: float) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(start, U_gg^-1, the rounding weights, U_g,later) for each column block g of one H block."""
        diag = np.diagonal(h).astype(np.float64)
        h = h.astype(np.float64) * (1 - shrink)
        dead = diag <= 0  # inputs the calibration never excited: any value is as good
        live_mean = diag[~dead].mean() if (~dead).any() else 1.0
        idx = np.arange(len(h))
        h[dead, :] = 0
        h[:, dead] = 0
        h[idx, idx] = np.where(dead, live_mean, diag) + damp * live_mean
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
        groups = []
        for a in range(0, len(h), block):
            b = a + block
            u_inv = np.linalg.inv(u[a:b, a:b])
            weights = np.einsum("ij,ij->i", u_inv, u_inv)  # diag(U_gg^-1 U_gg^-T)
            groups.append((a, u_inv.astype(np.float32), (weights / weights.mean()).astype(np.float32),
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
            for a, u_inv, weights, u_later in groups:
                cols = slice(base + a, base + a + self.block)
                q = quantize(x[:, cols], qtype, weights)
                err = (x[:, cols] - dequantize(q, qtype)) @ u_inv
                if u_later.shape[1]:
                    x[:, base + a + self.block:base + self.width] -= err @ u_later
                out.append(q)
        return np.concatenate(out, axis=1)


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
