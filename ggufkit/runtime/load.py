"""Loading a GGUF into llama.cpp: `load` gives llama-cpp-python's high-level `Llama` (chat, generate,
serve); `Session` is a bare context with explicit batches (perplexity, kld, bench), because those
need several sequences per batch and logits only at chosen positions, which `Llama` cannot do."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import numpy as np

from ggufkit.errors import GgufkitError
from ggufkit.gguffile.reader import GgufHeader, read_header

DEFAULT_CTX = 4096
GGML_LOG_LEVEL_ERROR = 4  # ggml.h of the vendored llama.cpp
_llama_errors: list[str] = []


def _keep_errors(level: int, text: bytes, user_data) -> None:
    if level == GGML_LOG_LEVEL_ERROR:
        _llama_errors.append(text.decode("utf-8", "replace").strip())


# Iterations libgomp's idle threads spin before they sleep, for processes that collect an imatrix
# (libgomp's default: 300000). Collection splits each graph at every weight and runs numpy between
# the pieces, while ggml's other thread spins on the second core. SmolLM2, 2 cores, imatrix with
# Hessians on 4 windows: 125-151 tokens/s by default, 177-222 at 10000, 244-260 sleeping at once
# (OMP_WAIT_POLICY=passive); generation: 138-168 tokens/s by default, 140-156 at 10000, but 49-51
# sleeping at once (ggml's barriers inside a graph are OpenMP's).
COLLECTION_SPINCOUNT = "10000"


def spin_briefly_between_graphs() -> None:
    """Set COLLECTION_SPINCOUNT if llama.cpp is not loaded yet (libgomp reads its settings once) and
    the user chose no OpenMP wait setting."""
    if "llama_cpp" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        os.environ["GOMP_SPINCOUNT"] = COLLECTION_SPINCOUNT


@functools.cache
def _llama_cpp():
    """Import llama_cpp with llama.cpp's log silenced; its error lines are kept for our messages.

    llama-cpp-python's own filter maps ggml's log levels by an older enum and lets warnings
    through even with verbose=False, hence a callback of our own."""
    import llama_cpp

    callback = llama_cpp.llama_log_callback(_keep_errors)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _llama_cpp.callback = callback  # ctypes callbacks must outlive their registration
    return llama_cpp


def ggml_library(name: str) -> ctypes.CDLL:
    """One of the ggml libraries beside the libllama llama-cpp-python loaded (its lib folder, or
    LLAMA_CPP_LIB_PATH, llama-cpp-python's switch to another llama.cpp build), so that one build of
    ggml serves the whole process."""
    llama_cpp = _llama_cpp()
    folder = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    # The wheel stores libggml.so, .so.0 and .so.0.x as copies, not links, and loading another copy
    # by path gives a second ggml (its own backend registry, which libllama never sees): take the
    # one already loaded under its soname (libggml.so.0, the shortest versioned name) where there is one.
    for versioned in sorted(folder.glob(f"{name}.*"), key=lambda p: len(p.name)):
        try:
            return ctypes.CDLL(versioned.name, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        except OSError:
            continue
    return ctypes.CDLL(str(folder / name))


def llama_error(default: str) -> str:
    """The first error llama.cpp logged since `check_model` (the cause; later lines are
    consequences), else `default`."""
    return _llama_errors[0] if _llama_errors else default


def check_model(path, n_gpu_layers: int = 0) -> GgufHeader:
    """Validate the file, silence llama.cpp, and warn when offload is asked of a CPU-only build."""
    header = read_header(path)
    lib = _llama_cpp()
    _llama_errors.clear()
    if n_gpu_layers != 0 and not lib.llama_supports_gpu_offload():
        print("ggufkit: warning: this llama-cpp-python build has no GPU backend; "
              f"--n-gpu-layers {n_gpu_layers} is ignored and the model runs on the CPU", file=sys.stderr)
    return header


def default_threads(threads: int | None) -> int:
    return threads or os.cpu_count() or 1


def load(path, n_ctx: int = DEFAULT_CTX, n_gpu_layers: int = 0, threads: int | None = None, rpc=None, **kwargs):
    """A `llama_cpp.Llama` for `path` (n_gpu_layers=-1 offloads all layers; with `rpc`, HOST:PORTs of
    ggml-rpc-servers, 0 does too); kwargs go to `Llama`."""
    from ggufkit.runtime.rpc import offloaded_layers, rpc_devices

    n_gpu_layers = offloaded_layers(n_gpu_layers, rpc)
    with rpc_devices(rpc):
        check_model(path, n_gpu_layers)
        llama_cpp = _llama_cpp()
        n = default_threads(threads)
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n,
                                   n_threads_batch=n, verbose=False, **kwargs)
        except ValueError as exc:  # llama-cpp-python reports every load failure as ValueError
            raise GgufkitError(f"llama.cpp could not load it: {llama_error(str(exc))}", path) from None


class Session:
    """One llama.cpp model and context with a raw batch: decode tokens at given positions and
    sequences, and get logits back only for the positions that asked for them."""

    def __init__(self, path, *, n_ctx: int, n_batch: int, n_seq: int = 1, n_ubatch: int = 512,
                 n_gpu_layers: int = 0, threads: int | None = None, cb_eval=None, rpc=None):
        """n_ctx is per sequence; cb_eval, a `llama_cpp.ggml_backend_sched_eval_callback`, sees
        every graph node (llama.cpp only takes it when the context is created); rpc: HOST:PORTs of
        ggml-rpc-servers to offload to (all layers unless n_gpu_layers says otherwise)."""
        from ggufkit.runtime.rpc import offloaded_layers, rpc_devices

        n_gpu_layers = offloaded_layers(n_gpu_layers, rpc)
        with rpc_devices(rpc):
            self._open(path, n_ctx, n_batch, n_seq, n_ubatch, n_gpu_layers, threads, cb_eval)

    def _open(self, path, n_ctx, n_batch, n_seq, n_ubatch, n_gpu_layers, threads, cb_eval) -> None:
        self.header = check_model(path, n_gpu_layers)
        self.path = Path(path)
        self.lib = lib = _llama_cpp()
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers  # INT32_MAX: all layers
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise GgufkitError(f"llama.cpp could not load it: {llama_error('unknown error')}", path)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_seq_max = n_ctx * n_seq, n_batch, n_seq
        cparams.n_ubatch = min(n_ubatch, n_batch)
        cparams.n_threads = cparams.n_threads_batch = self.threads = default_threads(threads)
        if cb_eval is not None:
            cparams.cb_eval = cb_eval
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise GgufkitError(f"llama.cpp could not create a context of {n_ctx * n_seq} tokens: "
                               f"{llama_error('unknown error')}", path)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self.batch = lib.llama_batch_init(n_batch, 0, 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    @property
    def bos(self) -> int | None:
        """The BOS token when the model wants one at the start of a sequence, else None."""
        if not self.lib.llama_vocab_get_add_bos(self.vocab):
            return None
        return self.lib.llama_vocab_bos(self.vocab)

    @property
    def add_eos(self) -> bool:
        return bool(self.lib.llama_vocab_get_add_eos(self.vocab))

    def tokenize(self, data: bytes) -> np.ndarray:
        """Tokens of `data` with the model's special tokens added (as llama.cpp's common_tokenize)."""
        buf = (self.lib.llama_token * (len(data) + 2))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        if n < 0:
            raise GgufkitError("tokenization failed", self.path)
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens, pos, seq, want) -> np.ndarray:
        """Decode one batch; returns the logits (n_wanted, n_vocab) of the positions where `want`,
        a view into llama.cpp's buffer (no copy of up to hundreds of MB): valid until the next decode."""
        n = len(tokens)
        want = np.broadcast_to(want, (n,))
        b = self.batch
        b.n_tokens = n
        np.ctypeslib.as_array(b.token, shape=(self.n_batch,))[:n] = tokens
        np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))[:n] = pos
        np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:n] = 1
        np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))[:n] = want
        for i, s in enumerate(np.broadcast_to(seq, (n,)).tolist()):
            b.seq_id[i][0] = s
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise GgufkitError(f"llama.cpp failed to decode a batch of {n} tokens: "
                               f"{llama_error('unknown error')}", self.path)
        n_out = int(np.count_nonzero(want))
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        logits = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                     shape=(n_out, self.n_vocab))

    def synchronize(self) -> None:
        self.lib.llama_synchronize(self.ctx)
