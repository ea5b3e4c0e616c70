"""`ggufkit imatrix`: importance matrix collection, llama-imatrix's method step for step.

The text is tokenized once (BOS added if the model wants it) and cut into windows of n_ctx tokens,
each starting with BOS in place of its first token, decoded with logits for every position (so the
last layer and output.weight see every token). llama.cpp calls `cb_eval` for every graph node;
for each MUL_MAT of a `blk.*` weight (and output.weight with --process-output) over at least 16
F32 activation rows, we add the squared activations per column and count the rows; for MUL_MAT_ID
(MoE experts) each token's row goes to the expert it was routed to.

Unlike llama-imatrix, we stop each graph once the last weight we collect has been seen (the first
window teaches which one that is): the output projection over every position, a fifth of SmolLM2's
and over half of Gemma 3's compute, only makes logits nobody reads."""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ggufkit.errors import GgufkitError
from ggufkit.gguffile.hessian import Hessian, hessian_width
from ggufkit.gguffile.imatrix import Entry, Imatrix, write_imatrix
from ggufkit.gguffile.writer import refuse_overwrite
from ggufkit.progress import bar
from ggufkit.runtime.load import Session, ggml_library, spin_briefly_between_graphs
from ggufkit.runtime.perplexity import read_text, split_windows

DEFAULT_CTX = 512
MIN_ROWS = 16  # llama-imatrix ignores smaller batches
GGML_TYPE_F32 = 0
GGML_OBJECT_SIZE = 32  # ggml's per-tensor bookkeeping header: checks our struct layout below


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h): GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64 bytes, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64. Its size is checked against ggml_tensor_overhead() at start-up."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml():
    """libggml-base from llama-cpp-python, with the few functions the collector calls."""
    lib = ggml_library("libggml-base.so")
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_tensor_overhead.restype, lib.ggml_tensor_overhead.argtypes = ctypes.c_size_t, []
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    if lib.ggml_tensor_overhead() != GGML_OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
        raise GgufkitError("this llama-cpp-python's ggml_tensor layout is not the one ggufkit knows")
    return lib


def weight_name(raw: bytes) -> str:
    """'CUDA0#blk.0.attn_k.weight#0' -> 'blk.0.attn_k.weight' (backend copies carry such affixes)."""
    name = raw.decode("utf-8", "replace")
    if "#" not in name:
        return name
    return name.split("#")[1]


class Collector:
    """The cb_eval callback and the running sums: float64 accumulators (llama-imatrix uses float32;
    ours are the more exact of the two, well within the 1e-3 parity bound). With `hessians`, also
    H = sum of x x^T per distinct input of a 2-D weight (gguffile.hessian's diagonal blocks)."""

    def __init__(self, process_output: bool, hessians: bool = False):
        self.ggml = _ggml()
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.hessians: dict[str, np.ndarray] | None = {} if hessians else None
        # weight -> the weight whose H it shares (q/k/v read one input, gate/up another): learnt on
        # the first window from the graph, where such weights multiply the same node
        self.shares: dict[str, str] = {}
        self._inputs: dict[int, str] = {}
        self.error: BaseException | None = None
        self._ops: dict[int, str] = {}
        # the graph's last collected weight, learnt on the first window: computing past it is wasted
        self._order: list[str] | None = []
        self.last: str | None = None
        self.callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)(self._call)

    def _op(self, op: int) -> str:
        if op not in self._ops:
            self._ops[op] = self.ggml.ggml_op_name(op).decode()
        return self._ops[op]

    def _call(self, ptr, ask, _user) -> bool:
        # an exception cannot cross into C: keep it, and stop the graph by returning False
        try:
            t = GgmlTensor.from_address(ptr)
            return self._wanted(t) if ask else self._collect(t)
        except BaseException as exc:  # noqa: BLE001 - re-raised after llama_decode returns
            self.error = exc
            return False

    def _wanted(self, t: GgmlTensor) -> bool:
        op = self._op(t.op)
        if op == "MUL_MAT_ID":
            return True
        if op != "MUL_MAT":
            return False
        src0, src1 = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != GGML_TYPE_F32:
            return False
        name = weight_name(src0.name)
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _array(self, t: GgmlTensor, ptr: int, dtype, shape_dims: int) -> np.ndarray:
        """The tensor's elements (ne[shape_dims-1], ..., ne[0]) by its byte strides: a view of host
        memory (valid only inside the callback), or a copy off the device."""
        nbytes = self.ggml.ggml_nbytes(ptr)
        if t.buffer and self.ggml.ggml_backend_buffer_is_host(t.buffer):
            raw = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(t.data), dtype=np.uint8)
        else:
            raw = np.empty(nbytes, dtype=np.uint8)
            self.ggml.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, nbytes)
        shape = tuple(t.ne[i] for i in reversed(range(shape_dims)))
        strides = tuple(t.nb[i] for i in reversed(range(shape_dims)))
        return np.lib.stride_tricks.as_strided(raw.view(dtype), shape=shape, strides=strides)

    def _entry(self, name: str, n_mat: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, cols), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums, counts = self.sums[name], self.counts[name]
        if sums.shape != (n_mat, cols):
            raise GgufkitError(f"inconsistent activation size for {name}: {sums.shape} vs {(n_mat, cols)}")
        return sums, counts

    def _collect(self, t: GgmlTensor) -> bool:
        src0, src1 = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
        name = weight_name(src0.name)
        x = self._array(src1, t.src[1], np.float32, 4)  # (ne3, ne2, ne1, ne0)
        if self._op(t.op) == "MUL_MAT_ID":
            self._collect_experts(t, name, src0, x[0])
        else:
            self._collect_dense(name, src0, x)
            if self.hessians is not None and src0.ne[2] * src0.ne[3] == 1:
                self._collect_hessian(name, t.src[1], x.reshape(-1, x.shape[-1]))
        if not np.isfinite(self.sums[name]).all():
            raise GgufkitError(f"non-finite activations in {name}")
        if self._order is not None:
            self._order.append(name)
        # False ends this graph split early (ggml_backend_sched skips its remaining nodes)
        return name != self.last

    def window_done(self) -> None:
        """After the first window: stop at its last collected weight from now on, provided each graph
        (one per physical batch) repeats the same sequence and uses that weight once, at its end."""
        order, self._order = self._order, None
        self._inputs.clear()
        if not order:
            return
        last = order[-1]
        k = order.count(last)
        period = len(order) // k
        graph = order[:period]
        if len(order) == period * k and graph.count(last) == 1 and order == graph * k:
            self.last = last

    def _collect_dense(self, name: str, src0: GgmlTensor, x: np.ndarray) -> None:
        # a 3-D/4-D weight gets one row of sums per matrix; activations broadcast over it
        ne2, ne3 = src0.ne[2], src0.ne[3]
        sums, counts = self._entry(name, ne2 * ne3, x.shape[-1])
        # (ne3, ne2, ne0): one window's rows summed in float32 (a float64 copy costs 20x the sum)
        sq = np.einsum("abij,abij->abj", x, x)
        for i3 in range(sq.shape[0]):
            for i2 in range(sq.shape[1]):
                sums[(i3 % ne3) * ne2 + i2 % ne2] += sq[i3, i2]
        counts += x.shape[0] * x.shape[1] * x.shape[2] // (ne2 * ne3)

    def _collect_hessian(self, name: str, input_node: int, x: np.ndarray) -> None:
        if name not in self.shares:  # first window: the first weight reading this node owns its H
            self.shares[name] = self._inputs.setdefault(input_node, name)
        if self.shares[name] != name:
            return
        cols = x.shape[1]
        width = hessian_width(cols)
        if name not in self.hessians:
            self.hessians[name] = np.zeros((cols // width, width, width), dtype=np.float32)
        blocks = np.ascontiguousarray(x).reshape(x.shape[0], cols // width, width).transpose(1, 0, 2)
        self.hessians[name] += np.matmul(blocks.transpose(0, 2, 1), blocks)

    def _collect_experts(self, t: GgmlTensor, name: str, src0: GgmlTensor, x: np.ndarray) -> None:
        """x: (n_tokens, n_expert_used or 1, cols); ids (n_tokens, n_expert_used) name each row's expert."""
        ids_t = GgmlTensor.from_address(t.src[2])
        ids = self._array(ids_t, t.src[2], np.int32, 2)
        n_as = src0.ne[2]
        if ids.min() < 0 or ids.max() >= n_as:
            raise GgufkitError(f"expert id out of range in {name}")
        sums, counts = self._entry(name, n_as, x.shape[-1])
        rows = x[:, np.arange(ids.shape[1]) % x.shape[1], :]  # (n_tokens, n_ids, cols)
        flat_ids = ids.reshape(-1)
        np.add.at(sums, flat_ids, (rows * rows).reshape(-1, x.shape[-1]))
        counts += np.bincount(flat_ids, minlength=n_as)

    def result(self, chunk_size: int, datasets: list[str]) -> Imatrix:
        entries = {n: Entry(s.astype(np.float32), self.counts[n].astype(np.float32)) for n, s in self.sums.items()}
        chunk_count = max((int(c.max()) for c in self.counts.values()), default=0) // chunk_size
        return Imatrix(entries, datasets, chunk_count, chunk_size)

    def hessian(self) -> Hessian | None:
        if self.hessians is None:
            return None
        return Hessian(self.hessians, {n: o for n, o in self.shares.items() if o in self.hessians})


@dataclass
class ImatrixRun:
    path: Path
    entries: int
    chunks: int
    tokens: int
    seconds: float


def collect(model, texts, ctx: int = DEFAULT_CTX, chunks: int | None = None, process_output: bool = False,
            n_gpu_layers: int = 0, threads: int | None = None,
            on_windows: tuple[tuple[int, ...], Callable[[Imatrix], None]] | None = None,
            hessians: bool = False, rpc=None) -> Imatrix:
    """The importance matrix of `model` over the concatenated `texts` (paths), with the input
    Hessians of its 2-D weights if `hessians`. `on_windows` = (counts, callback): the callback also
    gets the matrix of the first n windows for each n in counts (one pass gives a whole curve of
    calibration sizes). `rpc`: ggml-rpc-servers (HOST:PORT) to run the model on (the activations
    then come back over the network)."""
    if ctx < MIN_ROWS:
        raise GgufkitError(f"--ctx {ctx} is too small (llama-imatrix ignores batches under {MIN_ROWS} tokens)")
    texts = [Path(t) for t in texts]
    data = b"\n".join(read_text(t) for t in texts)
    spin_briefly_between_graphs()
    collector = Collector(process_output, hessians)
    # one window per batch, in physical batches of llama-imatrix's default 512
    with Session(model, n_ctx=ctx, n_batch=ctx, n_gpu_layers=n_gpu_layers, threads=threads,
                 cb_eval=collector.callback, rpc=rpc) as s:
        windows = split_windows(s.tokenize(data), ctx, chunks, texts[0])
        if s.bos is not None:
            windows[:, 0] = s.bos
        pos = np.arange(ctx, dtype=np.int32)
        with bar(total=len(windows), desc="imatrix", unit="chunk") as pbar:
            start = time.perf_counter()
            for i, window in enumerate(windows):
                s.clear()
                try:
                    s.decode(window, pos, 0, True)  # logits everywhere: every token reaches the last layer
                finally:
                    if collector.error is not None:
                        raise collector.error
                collector.window_done()
                if on_windows is not None and i + 1 in on_windows[0]:
                    on_windows[1](collector.result(ctx, [str(t) for t in texts]))
                pbar.set_postfix_str(f"{(i + 1) * ctx / (time.perf_counter() - start):.0f} tok/s")
                pbar.update(1)
    result = collector.result(ctx, [str(t) for t in texts])
    result.hessian = collector.hessian()
    return result


def imatrix(model, texts, out="imatrix.gguf", ctx: int = DEFAULT_CTX, chunks: int | None = None,
            process_output: bool = False, n_gpu_layers: int = 0, threads: int | None = None,
            force: bool = False, hessians: bool = False, rpc=None) -> ImatrixRun:
    """Collect and write the GGUF imatrix llama-quantize --imatrix reads (with `hessians`, carrying
    the input Hessians for ggufkit's error feedback too)."""
    out = Path(out)
    refuse_overwrite(out, force)
    start = time.perf_counter()
    result = collect(model, texts, ctx, chunks, process_output, n_gpu_layers, threads, hessians=hessians, rpc=rpc)
    path = write_imatrix(result, out)
    return ImatrixRun(path, len(result.entries), result.chunk_count, result.chunk_count * ctx,
                      time.perf_counter() - start)
