"""The public `quantize` / `dequantize`: validation, row chunks over threads, one kernel per type."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

from ggufkit.kquants.jit import all_finite
from ggufkit.kquants.registry import BLOCK_TYPES

# Elements per kernel call: enough to amortise the call, small enough that THREADS threads share
# a tensor evenly.
CHUNK_ELEMENTS = 1 << 20

# Chunks quantized at once, one thread per core as ggml's callers use (the kernels release the GIL).
THREADS = os.cpu_count() or 1

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_NO_IMATRIX = np.zeros(0, np.float32)


_pool: ThreadPoolExecutor | None = None


def set_threads(count: int) -> None:
    """Threads that quantize chunks at once (default: one per core)."""
    global THREADS
    if count < 1:
        raise ValueError(f"threads must be at least 1, got {count}")
    THREADS = count


def _threads() -> ThreadPoolExecutor:
    """One pool for the process, replaced when THREADS changes: starting threads for every tensor
    cost a third of `ggufkit quantize`'s time on a small model."""
    global _pool
    if _pool is None or _pool._max_workers != THREADS:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="kquants")
    return _pool


def qtype_of(qtype) -> GGMLQuantizationType:
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    try:
        return GGMLQuantizationType[str(qtype).upper()]
    except KeyError:
        raise ValueError(f"unknown quantization type {qtype!r}") from None


def supported_types() -> list[GGMLQuantizationType]:
    return sorted(BLOCK_TYPES, key=lambda t: t.name)


def quantize(weights, qtype, imatrix=None) -> np.ndarray:
    """Quantize a float32 (rows, cols) matrix to the bytes a GGUF stores, (rows, bytes_per_row)."""
    qt = qtype_of(qtype)
    if qt not in BLOCK_TYPES:
        raise ValueError(f"no quantizer for {qt.name}")
    block_type = BLOCK_TYPES[qt]
    x = np.asarray(weights, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"weights must be 2-D (rows, cols), got shape {x.shape}")
    rows, cols = x.shape
    if cols % block_type.block_size:
        raise ValueError(f"{qt.name}: row length {cols} is not a multiple of the block size {block_type.block_size}")
    if imatrix is None and block_type.needs_imatrix:
        raise ValueError(f"{qt.name} needs an importance matrix (imatrix): ggml has no formula without one")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (cols,):
            raise ValueError(f"imatrix must have shape ({cols},), got {imatrix.shape}")
        if not np.all(np.isfinite(imatrix)):
            raise ValueError("imatrix contains NaN or Inf")
    x = np.ascontiguousarray(x)
    out = np.empty((rows, cols // block_type.block_size * block_type.type_size), dtype=np.uint8)
    kernel = block_type.kernel_for(imatrix is not None)
    qw = _NO_IMATRIX if imatrix is None else imatrix

    def quantize_span(span: tuple[int, int]) -> bool:
        """Quantize rows a..b; False (nothing written) where they hold a NaN or Inf. Checked here,
        on each thread's rows just before they are quantized: a check of the whole tensor first took
        a fifth of Q4_0's time."""
        a, b = span
        if b == a:
            return True
        rows_x = x[a:b].reshape(-1)
        if not all_finite(rows_x):
            return False
        kernel(rows_x, qw, cols, out[a:b].reshape(-1), block_type.nmax, block_type.type_size)
        return True

    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    n_chunks = min(rows, max(THREADS, -(-rows // step)))
    bounds = [rows * i // n_chunks for i in range(n_chunks + 1)] if rows else [0, 0]
    spans = list(zip(bounds[:-1], bounds[1:]))
    if len(spans) == 1 or THREADS == 1:
        finite = all(quantize_span(span) for span in spans)
    else:
        finite = all(list(_threads().map(quantize_span, spans)))
    if not finite:
        raise ValueError("weights contain NaN or Inf")
    return out


def dequantize(data, qtype) -> np.ndarray:
    """Bytes as stored in a GGUF, (rows, bytes_per_row) uint8 -> float32 (rows, cols)."""
    qt = qtype_of(qtype)
    return _gguf_dequantize(np.asarray(data, dtype=np.uint8), qt).astype(np.float32, copy=False)


def encode(x: np.ndarray, qtype, imatrix=None) -> np.ndarray:
    """Any tensor (..., cols) -> the uint8 bytes a GGUF stores for `qtype`: float types through gguf's
    converters (exact ggml rounding), block types through our quantizers."""
    qt = qtype_of(qtype)
    if qt in FLOAT_TYPES:
        from gguf.quants import quantize as _gguf_quantize

        return np.ascontiguousarray(_gguf_quantize(np.asarray(x, dtype=np.float32), qt)).view(np.uint8)
    shape = x.shape
    q = quantize(np.asarray(x, dtype=np.float32).reshape(-1, shape[-1]), qt, imatrix)
    return q.reshape(*shape[:-1], q.shape[-1])
