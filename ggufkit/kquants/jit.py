"""numba set-up for the compiled kernels, and ggml's scalar float helpers in compiled form.

Kernels are compiled on first use and cached on disk (NUMBA_CACHE_DIR, by default under
~/.cache/ggufkit/numba), so a second process compiles nothing. They release the GIL: `api`
runs them on one thread per core over row chunks, as ggml_quantize_chunk's callers do.

Float semantics: every value is float32 and every expression is evaluated in ggml's operation
order; no fastmath (LLVM then neither reorders sums nor fuses multiply-adds, as ggml is built with
-std=c11, i.e. -ffp-contract=off).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def _cache_dir() -> Path:
    """A cache folder per version of these sources: numba checks only the timestamp of the file that
    defines a kernel, not of the helpers compiled into it from other files."""
    here = Path(__file__).parent
    sources = [here / f"{name}.py" for name in ("jit", "search", "legacy", "k_quants", "iq4", "ternary", "mxfp4",
                                                "lattice", "iq1")]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    root = Path(os.environ.get("GGUFKIT_CACHE") or Path.home() / ".cache" / "ggufkit") / "numba"
    if not (root / digest).exists() and root.is_dir():  # a new version: drop the old ones' code
        for old in root.iterdir():
            if old.is_dir() and len(old.name) == 16 and old.name != digest:
                shutil.rmtree(old, ignore_errors=True)
    return root / digest


# Must be set before numba is imported anywhere: numba reads it once.
os.environ.setdefault("NUMBA_CACHE_DIR", str(_cache_dir()))

import numpy as np  # noqa: E402
from numba import carray, njit, typeof, types  # noqa: E402
from numba.core import cgutils, config  # noqa: E402
from numba.core.compiler_lock import global_compiler_lock  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

F32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)
_MAGIC = np.float32(12582912.0)


def kernel(fn=None, *, slp: bool = False):
    """A compiled, cached kernel that runs without the GIL. With `slp`, compiled with LLVM's SLP
    vectorizer, which numba leaves off by default: it turns a block's fixed-width straight-line
    loops (16 or 32 elements, tree reductions) into vector instructions. Measured per kernel: the
    K-quant and legacy searches ran 1.5-3.5x faster with it, the lattice searches up to 20% slower.
    It packs independent operations into vectors and never reorders a float expression: the bytes
    stay ggml's (the parity tests hold them)."""
    if fn is None:
        return lambda f: kernel(f, slp=slp)
    compiled = njit(cache=True, nogil=True, error_model="numpy")(fn)
    return SlpKernel(compiled) if slp else compiled


class SlpKernel:
    """A kernel compiled with the SLP vectorizer on: the setting is numba's global, read when a
    function is optimized, so it is set only while this kernel compiles (or loads from the disk
    cache), under numba's compiler lock, which every other compilation waits for."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.__doc__, self.__name__ = dispatcher.py_func.__doc__, dispatcher.py_func.__name__

    def __call__(self, *args):
        signature = tuple(typeof(a) for a in args)
        if signature not in self.dispatcher.overloads:
            with global_compiler_lock:
                saved, config.SLP_VECTORIZE = config.SLP_VECTORIZE, 1
                try:
                    self.dispatcher.compile(signature)
                finally:
                    config.SLP_VECTORIZE = saved
        return self.dispatcher(*args)


def inline(fn):
    """A helper compiled into the kernels that call it."""
    return njit(inline="always", cache=True, error_model="numpy")(fn)


@intrinsic
def _stack(typingctx, count, dtype):
    """A pointer to `count` (a literal) elements of `dtype` on the stack of the compiled kernel."""
    if not isinstance(count, types.IntegerLiteral):
        return None
    n = count.literal_value

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(dtype.dtype)
        return cgutils.alloca_once(builder, ty, size=context.get_constant(types.intp, n))
    return types.CPointer(dtype.dtype)(count, dtype), codegen


# Scratch arrays of the kernels live on the stack, not on the heap: the compiler then knows that no
# two of them overlap and vectorizes the lane loops without runtime alias checks; with heap arrays it
# gave up on most loops (measured 11x slower per search step).
@inline
def lane_vec(dtype):
    """A (16,) scratch array: one value per lane."""
    return carray(_stack(16, dtype), (16,))


@inline
def lane_mat(rows, dtype):
    """A (rows, 16) scratch array, rows <= 32: a block of up to 32 elements per lane."""
    return carray(_stack(512, dtype), (rows, 16))


@inline
def stack_vec(dtype):
    """A (512,) scratch array on the stack."""
    return carray(_stack(512, dtype), (512,))


@inline
def block_vec(dtype):
    """A (32,) scratch array on the stack: one value per element of a 32-block."""
    return carray(_stack(32, dtype), (32,))


@inline
def tree_max(k):
    """max(k) of a (32,) array (destroyed) in a tree of halves: straight-line vector code with
    `slp`, where a running max is a chain of 32 dependent compares."""
    for j in range(16):
        k[j] = max(k[j], k[j + 16])
    for j in range(8):
        k[j] = max(k[j], k[j + 8])
    for j in range(4):
        k[j] = max(k[j], k[j + 4])
    for j in range(2):
        k[j] = max(k[j], k[j + 2])
    return max(k[0], k[1])


@kernel
def all_finite(x):
    """No NaN or Inf in x (float32, 1-D): an exponent of all ones is either."""
    bits = x.view(np.int32)
    bad = np.int32(0)
    for i in range(bits.shape[0]):
        bad |= np.int32((bits[i] & np.int32(0x7F800000)) == np.int32(0x7F800000))
    return bad == 0


@inline
def abs_key(v):
    """The bits of |v| as an int32: ordered as |v| for finite v."""
    return np.int32(np.float32(v).view(np.int32) & np.int32(0x7FFFFFFF))


@inline
def nearest_int(v):
    """ggml's nearest_int bit for bit: round half to even for |v| < 2^22, and the same value as its
    12582912 magic-number trick outside that range (0 for NaN)."""
    return (np.float32(v + _MAGIC).view(np.int32) & np.int32(0x7FFFFF)) - np.int32(0x400000)


@inline
def nearest_f(v, lo, hi):
    """MAX(lo, MIN(hi, nearest_int(v))) as a float32 (lo, hi float32)."""
    return min(max(np.float32(nearest_int(v)), lo), hi)


@inline
def round_f(v, lo, hi):
    """nearest_f for |v| < 2^22, in float arithmetic only (v + 1.5*2^23 rounds to an integer, half
    to even, and subtracting it back is exact): for the searches' hot loops, whose arguments are
    bounded by the level count. Elsewhere nearest_f reproduces ggml's result for any argument."""
    return min(max((v + _MAGIC) - _MAGIC, lo), hi)


@inline
def level_f(v, lo, hi, exact):
    """round_f, or nearest_f where the caller could not bound |v| below 2^21 (a loop-invariant flag:
    the compiler keeps a copy of the loop for each case)."""
    return nearest_f(v, lo, hi) if exact else round_f(v, lo, hi)


@inline
def fp16_bits(f):
    """GGML_FP32_TO_FP16 (F16C, round to nearest even, overflow to inf) as an int in [0, 65535]."""
    u = np.int64(np.float32(f).view(np.uint32))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf, or NaN keeping its top payload bits
        h = 0x7C00 | ((a & 0x7FFFFF) >> 13)
        return sign | (0x7C01 if a != 0x7F800000 and h == 0x7C00 else h)
    if a >= 0x38800000:  # a normal half (or overflow to inf)
        h = (a - 0x38000000) >> 13
        rem = a & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
            h += 1
        return sign | min(h, 0x7C00)
    # subnormal half: |f| in units of 2^-24 (exact in float32), rounded half to even
    return sign | np.int64(nearest_int(abs(np.float32(f)) * np.float32(16777216.0)))


@inline
def fp16_value(h):
    """GGML_FP16_TO_FP32 of half bits h."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(5.9604644775390625e-08)
        return -v if h & 0x8000 else v
    sign = np.int64(h & 0x8000) << 16
    bits = sign | (np.int64(0x7F800000) if e == 31 else np.int64(e + 112) << 23) | (np.int64(m) << 13)
    return np.uint32(bits).view(np.float32)


@inline
def c_int8(v):
    """C's (int8_t)f for a float f as x86 compiles it: truncate to int32 (0x80000000 when out of range
    or NaN), keep the low byte, as a signed value."""
    ok = (v > F32(-2147483648.0)) & (v < F32(2147483648.0))  # false for NaN
    i = np.int32(v if ok else F32(0))  # a select, then an in-range cast: vectorizes, no poison
    b = (i if ok else np.int32(-2147483648)) & np.int32(0xFF)
    return b - np.int32(256) if b > np.int32(127) else b


@inline
def put_fp16(out, pos, f):
    """Store GGML_FP32_TO_FP16(f) little-endian at out[pos:pos+2]; returns the stored half's value."""
    h = fp16_bits(f)
    out[pos] = h & 0xFF
    out[pos + 1] = h >> 8
    return fp16_value(h)
