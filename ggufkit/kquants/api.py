"""The public `quantize` / `dequantize`: validation, chunking, dispatch to one quantizer per type."""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import sys
import threading
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

from ggufkit.kquants.registry import QUANTIZERS

# Rows handed to a quantizer at once: bounds the temporaries of the vectorized searches (a few
# dozen float32 copies of the chunk). 2^18 elements (1 MiB per copy) keeps them cache-resident:
# measured 1.6-1.8x faster than 2^20 on the imatrix searches, and faster than 2^17 or 2^16.
CHUNK_ELEMENTS = 1 << 18

# Chunks quantized concurrently, one worker per core as ggml uses; memory stays bounded at a few
# chunks in flight. The searches run on worker processes: numpy releases the GIL only inside each
# ufunc, and their thousands of short ufunc calls per chunk left two threads 1.45x as fast as one
# (Q5_0 with an imatrix; two processes side by side each run at full speed). Measured on 2 cores:
# Q4_0+imatrix 133 -> 98 ms per 4.7M weights, ggufkit quantize SmolLM2 Q4_K_M 6.8 -> 5.0 s.
# Threads remain for light work, for library callers that did not opt in, and where processes
# cannot start.
THREADS = os.cpu_count() or 1
_workers: "_Workers | None" = None
_use_processes = False


def worker_processes(enabled: bool = True, count: int | None = None) -> None:
    """Run the scale searches on worker processes, `count` of them (default one per core; it also
    sets the threads otherwise used; give it before the first quantization). Off by default for
    library callers: spawned workers import the caller's main module, which a script without an
    `if __name__ == "__main__":` guard would run again. ggufkit's CLI turns it on."""
    global _use_processes, THREADS
    _use_processes = enabled
    if count is not None:
        if count < 1:
            raise ValueError(f"workers must be at least 1, got {count}")
        THREADS = count


@functools.cache
def _reuse_freed_memory() -> None:
    """glibc hands freed multi-MiB blocks back to the OS, so each new chunk temporary page-faults
    afresh, which costs more than the ufunc filling it (measured 2.8 ms vs 0.16 ms for two 1 MiB
    temporaries). Serve them from the heap instead, and keep up to 256 MiB of it for reuse."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: leave the allocator alone
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 256 << 20)
    mallopt(m_mmap_threshold, 32 << 20)


def qtype_of(qtype) -> GGMLQuantizationType:
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    try:
        return GGMLQuantizationType[str(qtype).upper()]
    except KeyError:
        raise ValueError(f"unknown quantization type {qtype!r}") from None


def _load_type_modules() -> None:
    # Importing a type module registers its quantizers.
    from ggufkit.kquants import legacy, k_quants, iq4  # noqa: F401


def supported_types() -> list[GGMLQuantizationType]:
    _load_type_modules()
    return sorted(QUANTIZERS, key=lambda t: t.name)


def quantize(weights, qtype, imatrix=None) -> np.ndarray:
    """Quantize a float32 (rows, cols) matrix to the bytes a GGUF stores, (rows, bytes_per_row)."""
    qt = qtype_of(qtype)
    _load_type_modules()
    if qt not in QUANTIZERS:
        raise ValueError(f"no quantizer for {qt.name}")
    x = np.asarray(weights, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"weights must be 2-D (rows, cols), got shape {x.shape}")
    block, type_size = GGML_QUANT_SIZES[qt]
    rows, cols = x.shape
    if cols % block:
        raise ValueError(f"{qt.name}: row length {cols} is not a multiple of the block size {block}")
    if imatrix is not None:
        imatrix = np.asarray(imatrix, dtype=np.float32)
        if imatrix.shape != (cols,):
            raise ValueError(f"imatrix must have shape ({cols},), got {imatrix.shape}")
        if not np.all(np.isfinite(imatrix)):
            raise ValueError("imatrix contains NaN or Inf")
    if not np.all(np.isfinite(x)):
        raise ValueError("weights contain NaN or Inf")
    _reuse_freed_memory()
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    # A multiple of THREADS chunks (each at most `step` rows) keeps the workers equally busy.
    n_chunks = min(rows, -(-rows // (step * THREADS)) * THREADS)
    if n_chunks == 1:
        out[:] = quantize_rows(qt, x, imatrix)
    elif n_chunks > 1 and not _in_processes(qt, x, imatrix, out):
        bounds = [rows * i // n_chunks for i in range(n_chunks + 1)]
        spans = list(zip(bounds[:-1], bounds[1:]))

        def quantize_span(span: tuple[int, int]) -> None:
            out[span[0]:span[1]] = quantize_rows(qt, x[span[0]:span[1]], imatrix)

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(quantize_span, spans))
    return out


def quantize_rows(qt: GGMLQuantizationType, rows: np.ndarray, imatrix) -> np.ndarray:
    """One chunk through its type's quantizer (in this process or a worker)."""
    _load_type_modules()
    # Quantizers reproduce ggml's float semantics, inf and NaN intermediates included (huge or
    # subnormal weights): those are results to match, not errors to report. errstate is per thread.
    with np.errstate(all="ignore"):
        return QUANTIZERS[qt](np.ascontiguousarray(rows), imatrix)


# Rows per round through the workers' shared input buffer: bounds the buffer (kept for the next call,
# so neither side page-faults it afresh) whatever the tensor's size. Small, as /dev/shm may be (64 MiB
# in a default Docker container, where overfilling it is a SIGBUS): 8 MiB is 4 chunks per worker
# per round on 2 cores, as fast as 32 MiB was (ggufkit quantize, SmolLM2 Q4_K_M).
SHARED_BYTES = 8 << 20
_attached: dict[str, SharedMemory] = {}  # in a worker: the parent's buffers, mapped once


def _attach(*names: str) -> list[SharedMemory]:
    """In a worker: the parent's current buffers, mapped once; mappings of replaced ones are closed
    (between tasks, when no array views them)."""
    for name in [n for n in _attached if n not in names]:
        _attached.pop(name).close()
    for name in names:
        if name not in _attached:
            _attached[name] = SharedMemory(name)
    return [_attached[n] for n in names]


def _quantize_shared(qt, src: tuple, dst: tuple, start: int, stop: int, step: int, imatrix) -> None:
    """A worker's task: rows [start, stop) of the shared input, `step` rows at a time, into the shared
    output; src and dst are (buffer name, array shape)."""
    shm_in, shm_out = _attach(src[0], dst[0])
    x, out = np.ndarray(src[1], np.float32, shm_in.buf), np.ndarray(dst[1], np.uint8, shm_out.buf)
    for a in range(start, stop, step):
        b = min(stop, a + step)
        out[a:b] = quantize_rows(qt, x[a:b], imatrix)


class _Workers:
    """THREADS worker processes and the shared buffers they read rows from and write bytes into."""

    def __init__(self):
        # spawn: a fresh interpreter, safe whatever threads this process runs (llama.cpp, tqdm)
        self.pool = ProcessPoolExecutor(THREADS, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_reuse_freed_memory)
        self.lock = threading.Lock()
        self.buffers: list[SharedMemory] = []
        atexit.register(self.release)

    def _buffers(self, in_bytes: int, out_bytes: int) -> tuple[SharedMemory, SharedMemory]:
        if not self.buffers or self.buffers[0].size < in_bytes or self.buffers[1].size < out_bytes:
            self.release()
            self.buffers = [SharedMemory(create=True, size=max(1, n)) for n in (in_bytes, out_bytes)]
        return self.buffers[0], self.buffers[1]

    def release(self) -> None:
        for shm in self.buffers:
            shm.close()
            shm.unlink()
        self.buffers = []

    def quantize(self, qt, x: np.ndarray, imatrix, out: np.ndarray) -> None:
        rows, cols = x.shape
        per_round = min(rows, max(1, SHARED_BYTES // (4 * cols)))
        step = max(1, CHUNK_ELEMENTS // cols)
        with self.lock:
            shm_in, shm_out = self._buffers(per_round * cols * 4, per_round * out.shape[1])
            for r0 in range(0, rows, per_round):
                n = min(per_round, rows - r0)
                np.ndarray((n, cols), np.float32, shm_in.buf)[:] = x[r0:r0 + n]
                src, dst = (shm_in.name, (n, cols)), (shm_out.name, (n, out.shape[1]))
                bounds = [n * i // THREADS for i in range(THREADS + 1)]
                futures = [self.pool.submit(_quantize_shared, qt, src, dst, a, b, step, imatrix)
                           for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
                for f in futures:
                    f.result()
                out[r0:r0 + n] = np.ndarray((n, out.shape[1]), np.uint8, shm_out.buf)


# ggml's plain formulas (no search): a few numpy passes per chunk, which threads scale as they are;
# the copies through the workers' buffer would cost more than they save.
LEGACY = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
          GGMLQuantizationType.Q5_1)


def _light(qt: GGMLQuantizationType, imatrix) -> bool:
    return qt == GGMLQuantizationType.Q8_0 or (imatrix is None and qt in LEGACY)


def _in_processes(qt, x: np.ndarray, imatrix, out: np.ndarray) -> bool:
    """Quantize on the worker processes; False (nothing done) for light work or where they cannot run."""
    global _workers, _use_processes
    if not _use_processes or THREADS < 2 or _light(qt, imatrix):
        return False
    try:
        if _workers is None:
            _workers = _Workers()
        _workers.quantize(qt, x, imatrix, out)
        return True
    except (BrokenProcessPool, OSError, RuntimeError) as exc:
        # e.g. an embedding script without a __main__ guard, or a sandbox without processes
        _use_processes = False
        reason = (str(exc).strip().splitlines() or [""])[0]
        print(f"ggufkit: quantizing on threads, worker processes failed ({type(exc).__name__}: {reason})",
              file=sys.stderr)
        return False


def dequantize(data, qtype) -> np.ndarray:
    """Bytes as stored in a GGUF, (rows, bytes_per_row) uint8 -> float32 (rows, cols)."""
    qt = qtype_of(qtype)
    return _gguf_dequantize(np.asarray(data, dtype=np.uint8), qt).astype(np.float32, copy=False)


FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


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
