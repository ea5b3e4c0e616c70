"""Input Hessians for error-feedback quantization: H = sum of x x^T over the calibration tokens, one
per distinct input of the model's 2-D weights (attn_q/k/v read one input and share one H, ffn_gate/up
another), collected by runtime.imatrix beside the importance matrix (whose sums are H's diagonal).

H is kept as diagonal blocks (n_blocks, width, width): the whole matrix where the input is narrow,
and blocks aligned with the quantization blocks where a full H would not fit in memory (an input of
14336 columns would need 0.8 GB per layer in float32)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Inputs up to this many columns get their whole H; wider ones blocks of at most this width.
FULL_WIDTH = 2048


def hessian_width(cols: int, limit: int = FULL_WIDTH) -> int:
    """The width of H's diagonal blocks for an input of `cols` columns: `cols` itself up to `limit`,
    else the widest divisor of cols up to `limit` that is a multiple of 256 (K-quant super-blocks),
    or failing that of 32 (the legacy blocks)."""
    if cols <= limit:
        return cols
    for unit in (256, 32):
        for width in range(limit - limit % unit, 0, -unit):
            if cols % width == 0:
                return width
    return cols


@dataclass
class Hessian:
    blocks: dict[str, np.ndarray]  # owner weight -> float32 (n_blocks, width, width)
    shares: dict[str, str]  # every weight with an H -> the weight that owns it

    def of(self, name: str) -> np.ndarray | None:
        """The diagonal blocks of H for weight `name`, or None when none was collected."""
        owner = self.shares.get(name)
        return None if owner is None else self.blocks[owner]
