"""One place per block type: its layout (elements and bytes per block, from gguf's table) and the
compiled kernel that writes its blocks, with the kernel's per-type parameter.

A kernel is `(x: float32 (rows*cols,), imatrix: float32 (cols,) or empty, cols, out: uint8
(rows*row_bytes,), nmax, type_size) -> None`: it writes exactly the bytes a GGUF stores, as ggml's
quantize_<type> does with or without quant_weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ggufkit.kquants import iq1, iq4, k_quants, lattice, legacy, mxfp4, ternary


@dataclass(frozen=True)
class BlockType:
    qtype: T
    kernel: Callable
    nmax: int = 0  # the kernel's level count parameter, where one kernel serves several types
    ref_kernel: Callable | None = None  # ggml's formula without an imatrix, where it differs
    needs_imatrix: bool = False  # ggml has no formula without one (ggml_quantize_requires_imatrix)

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    def kernel_for(self, has_imatrix: bool) -> Callable:
        return self.kernel if has_imatrix or self.ref_kernel is None else self.ref_kernel


BLOCK_TYPES: dict[T, BlockType] = {b.qtype: b for b in [
    BlockType(T.Q4_0, legacy.symmetric_search, 8, legacy.q4_0_ref),
    BlockType(T.Q5_0, legacy.symmetric_search, 16, legacy.q5_0_ref),
    BlockType(T.Q4_1, legacy.affine_search, 15, legacy.q4_1_ref),
    BlockType(T.Q5_1, legacy.affine_search, 31, legacy.q5_1_ref),
    BlockType(T.Q8_0, legacy.q8_0),
    BlockType(T.Q2_K, k_quants.q2_k),
    BlockType(T.Q3_K, k_quants.q3_k),
    BlockType(T.Q4_K, k_quants.affine_k4, 15),
    BlockType(T.Q5_K, k_quants.affine_k4, 31),
    BlockType(T.Q6_K, k_quants.q6_k),
    BlockType(T.IQ4_NL, iq4.iq4_nl),
    BlockType(T.IQ4_XS, iq4.iq4_xs),
    BlockType(T.TQ1_0, ternary.tq1_0),
    BlockType(T.TQ2_0, ternary.tq2_0),
    BlockType(T.MXFP4, mxfp4.mxfp4),
    BlockType(T.IQ3_XXS, lattice.with_lattice(T.IQ3_XXS, lattice.iq3_xxs)),
    BlockType(T.IQ3_S, lattice.with_lattice(T.IQ3_S, lattice.iq3_s)),
    BlockType(T.IQ2_XXS, lattice.with_lattice(T.IQ2_XXS, lattice.iq2_xxs), needs_imatrix=True),
    BlockType(T.IQ2_XS, lattice.with_lattice(T.IQ2_XS, lattice.iq2_xs), needs_imatrix=True),
    BlockType(T.IQ2_S, lattice.with_lattice(T.IQ2_S, lattice.iq2_s)),
    BlockType(T.IQ1_S, lattice.with_lattice(T.IQ1_S, iq1.iq1_s), needs_imatrix=True),
    BlockType(T.IQ1_M, lattice.with_lattice(T.IQ1_M, iq1.iq1_m)),
]}
