"""llama.cpp itself: ggml's C quantizer through ctypes, the sdist's vendored llama.cpp source, the
tools built from it, and its own converter."""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from ggufkit.models import cache_dir
from reference import uses

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36"


def ggml_lib() -> ctypes.CDLL:
    uses("ggml")
    return _ggml_lib()


@functools.lru_cache(maxsize=None)
def _ggml_lib() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


class _TypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


def ggml_quantize(x: np.ndarray, qtype, imatrix: np.ndarray | None = None, start_row: int = 0,
                  nrows: int | None = None) -> np.ndarray:
    """ggml_quantize_chunk over rows [start_row, start_row + nrows) of x; returns (nrows, row_bytes)."""
    from gguf import GGML_QUANT_SIZES

    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    nrows = rows - start_row if nrows is None else nrows
    block, type_size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((nrows, cols // block * type_size), dtype=np.uint8)
    src = x[start_row:start_row + nrows]
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    # start=0 on a sub-array: ggml's `start` only offsets src/dst by whole rows.
    ggml_lib().ggml_quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, nrows, cols,
                                   None if imat is None else imat.ctypes.data)
    return out


def ggml_quantize_or_abort(x: np.ndarray, qtype, imatrix: np.ndarray | None = None) -> np.ndarray | None:
    """ggml_quantize in a forked child: None where ggml aborts (a failed GGML_ASSERT), as its i-quant
    lattice searches do on weights whose float32 distances overflow."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    ggml_lib().ggml_quantize_init(int(qtype))  # its tables, once in this process rather than in every child
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: quantize, send the bytes, exit without running the parent's cleanup
        status = 1
        try:
            os.close(read_end)
            os.environ["GGML_NO_BACKTRACE"] = "1"
            faulthandler.disable()  # the abort is expected: no Python traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # nor ggml's assertion message
            with os.fdopen(write_end, "wb") as f:
                f.write(ggml_quantize(x, qtype, imatrix).tobytes())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT:
        return None
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"ggml_quantize's child process failed (status {status})")
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    return np.frombuffer(data, np.uint8).reshape(x.shape[0], x.shape[1] // block * type_size).copy()


def ggml_dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """ggml's dequantize_row_* (the type's to_float) of (rows, row_bytes) blocks; returns (rows, cols)."""
    from gguf import GGML_QUANT_SIZES

    data = np.ascontiguousarray(data, dtype=np.uint8)
    block, type_size = GGML_QUANT_SIZES[qtype]
    out = np.empty((data.shape[0], data.shape[1] // type_size * block), dtype=np.float32)
    ggml_lib().ggml_get_type_traits(int(qtype)).contents.to_float(data.ctypes.data, out.ctypes.data, out.size)
    return out


def llama_cpp_source() -> Path:
    """The sdist's vendored llama.cpp tree (fetched once with pip download, unpacked in the cache)."""
    uses("tools")
    root = cache_dir() / "src"
    tree = root / SDIST / "vendor" / "llama.cpp"
    if tree.exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(root), LLAMA_CPP_PYTHON], check=True)
    with tarfile.open(root / f"{SDIST}.tar.gz") as tf:
        tf.extractall(root, filter="data") if sys.version_info >= (3, 12) else tf.extractall(root)
    return tree


def llama_tools(*names: str) -> list[Path]:
    """Paths of llama.cpp tools (llama-perplexity, llama-bench, ...), built once with cmake.

    Missing targets are built in one cmake call: configuring and compiling the shared libraries
    dominates, so building tools one by one would repeat minutes of work."""
    src = llama_cpp_source()
    build = cache_dir() / "llama.cpp-build"
    exes = [build / "bin" / name for name in names]
    missing = [exe.name for exe in exes if not exe.exists()]
    if missing:
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *missing],
                       check=True, stdout=subprocess.DEVNULL)
    return exes


def llama_tool(name: str) -> Path:
    """Path of one llama.cpp tool (llama-perplexity, llama-quantize, ...), built once with cmake."""
    return llama_tools(name)[0]


def llama_rpc() -> tuple[Path, Path]:
    """(ggml-rpc-server, libggml-rpc.so) from the vendored llama.cpp, built once with cmake.

    A build folder of its own: GGML_RPC adds a public compile definition to ggml, so turning it on in
    llama_tools' build would rebuild (and could change) every tool. Backends stay linked in
    (GGML_BACKEND_DL=OFF), since ggml refuses GGML_NATIVE with loadable backends: the server's CPU
    backend is then built as the tools' and llama-cpp-python's are, and computes as they do. The
    shared libggml-rpc.so exports ggml_backend_rpc_reg, which ggufkit registers in the
    llama-cpp-python process (GGUFKIT_GGML_RPC), where it binds to the libggml-base already loaded
    there by its soname."""
    src = llama_cpp_source()
    build = cache_dir() / "llama.cpp-rpc-build"
    server, lib = build / "bin" / "ggml-rpc-server", build / "bin" / "libggml-rpc.so"
    if not (server.exists() and lib.exists()):
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=ON",
                        "-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target",
                        "ggml-rpc-server"], check=True, stdout=subprocess.DEVNULL)
    return server, lib


def hf_to_gguf(model_dir: Path, outfile: Path, outtype: str) -> Path:
    """Run llama.cpp's own convert_hf_to_gguf.py (needs torch and transformers, test-only)."""
    uses("torch")
    script = llama_cpp_source() / "convert_hf_to_gguf.py"
    subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(outfile),
                    "--outtype", outtype], check=True, capture_output=True)
    return outfile
