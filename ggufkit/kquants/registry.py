"""One place that maps a GGML type to the quantizer implementing it.

A quantizer is a function `(rows: float32 (r, cols), imatrix: float32 (cols,) | None) -> uint8
(r, bytes_per_row)`: exactly the bytes a GGUF stores. It must be vectorized over every block of
the chunk it is given (no Python loop per block or per row); `api.quantize` feeds it bounded chunks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

Quantizer = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]

QUANTIZERS: dict[GGMLQuantizationType, Quantizer] = {}


def register(qtype: GGMLQuantizationType):
    def wrap(fn: Quantizer) -> Quantizer:
        QUANTIZERS[qtype] = fn
        return fn
    return wrap
