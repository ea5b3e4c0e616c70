"""`ggufkit perplexity`: llama-perplexity's method, step for step.

The text is tokenized once (BOS added if the model wants it) and cut into consecutive windows of
n_ctx tokens; each window starts with BOS in place of its first token and only its second half
is scored, so every scored token has at least n_ctx/2 tokens of context. When the batch holds
several windows they are decoded together as parallel sequences, as llama-perplexity does."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ggufkit.errors import GgufkitError
from ggufkit.progress import bar
from ggufkit.runtime.load import Session

DEFAULT_CTX = 512
DEFAULT_BATCH = 2048  # llama-perplexity's default: 4 windows of 512 per decode


def read_text(path) -> bytes:
    """The text as llama.cpp's `-f` reads it: raw bytes, one trailing newline dropped."""
    path = Path(path)
    if not path.is_file():
        raise GgufkitError("no such text file", path)
    data = path.read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


def batch_layout(n_ctx: int, n_batch: int) -> tuple[int, int]:
    """(windows per decode, tokens per decode), with llama-perplexity's constraint on the batch."""
    if n_ctx < 4:
        raise GgufkitError(f"--ctx {n_ctx} is too small (need at least 4)")
    if n_batch >= n_ctx and n_batch % n_ctx:
        raise GgufkitError(f"--batch {n_batch} must be below --ctx {n_ctx} or a multiple of it")
    n_seq = max(1, n_batch // n_ctx)
    return n_seq, min(n_batch, n_seq * n_ctx)


def split_windows(tokens: np.ndarray, n_ctx: int, chunks: int | None, source) -> np.ndarray:
    """(n_chunk, n_ctx) windows; like llama-perplexity, refuses texts under two windows long."""
    if len(tokens) < 2 * n_ctx:
        raise GgufkitError(f"text too short: {len(tokens)} tokens, need at least {2 * n_ctx} "
                           f"(2 x ctx {n_ctx}) for the perplexity method", source)
    n_chunk = len(tokens) // n_ctx if chunks is None else min(chunks, len(tokens) // n_ctx)
    if n_chunk < 1:
        raise GgufkitError(f"--chunks {chunks}: need at least one chunk")
    return tokens[:n_chunk * n_ctx].reshape(n_chunk, n_ctx)


def scored_logits(session: Session, windows: np.ndarray, n_batch: int,
                  desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each window: (logits of positions n_ctx/2 .. n_ctx-2, the tokens they predict). The logits
    may live in llama.cpp's buffer: use them before asking for the next window."""
    n_chunk, n_ctx = windows.shape
    n_seq, n_batch = batch_layout(n_ctx, n_batch)
    first = n_ctx // 2
    inputs = windows.copy()
    if session.bos is not None:
        inputs[:, 0] = session.bos
    positions = np.arange(n_ctx, dtype=np.int32)
    with bar(total=n_chunk, desc=desc, unit="chunk") as progress:
        for start in range(0, n_chunk, n_seq):
            group = inputs[start:start + n_seq]
            session.clear()
            if n_seq > 1:  # whole windows side by side, one sequence each
                logits = session.decode(group.ravel(), np.tile(positions, len(group)),
                                        np.repeat(np.arange(len(group), dtype=np.int32), n_ctx),
                                        np.tile(positions >= first, len(group)))
            else:  # one window in slices of n_batch; copies, as each decode reuses the buffer
                logits = np.concatenate([
                    session.decode(group[0, j:j + n_batch], positions[j:j + n_batch], 0,
                                   positions[j:j + n_batch] >= first).copy()
                    for j in range(0, n_ctx, n_batch)])
            for k in range(len(group)):
                rows = logits[k * (n_ctx - first):(k + 1) * (n_ctx - first) - 1]
                yield rows, windows[start + k, first + 1:]
                progress.update()


def token_nll(logits: np.ndarray, targets: np.ndarray, threads: int = 1) -> np.ndarray:
    """-log softmax(logits)[target] per row, with llama.cpp's precision (float exp, double sums).
    Rows are split over `threads` (numpy releases the GIL), as llama-perplexity splits them."""
    if threads > 1 and len(logits) >= 2 * threads:
        edges = np.linspace(0, len(logits), threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            return np.concatenate(list(pool.map(lambda a, b: token_nll(logits[a:b], targets[a:b]),
                                                edges[:-1], edges[1:])))
    peak = logits.max(axis=1)
    shifted = logits - peak[:, None]
    log_sum = np.log(np.exp(shifted, out=shifted).sum(axis=1, dtype=np.float64))
    picked = logits[np.arange(len(targets)), targets] - peak
    return log_sum - picked.astype(np.float64)


def mean_and_stderr(total: float, total_sq: float, count: int) -> tuple[float, float]:
    """Mean and its standard error from running sums, as llama-perplexity computes them."""
    mean = total / count
    var = total_sq / count - mean * mean
    return mean, float(np.sqrt(var / (count - 1))) if var > 0 and count > 1 else 0.0


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    tokens: int  # scored tokens
    chunks: int
    ctx: int
    seconds: float


def perplexity(model, text, ctx: int = DEFAULT_CTX, chunks: int | None = None, batch: int = DEFAULT_BATCH,
               n_gpu_layers: int = 0, threads: int | None = None, rpc=None) -> PerplexityResult:
    """Perplexity of `model` (a GGUF path) on the text file `text`; `rpc`: ggml-rpc-servers
    (HOST:PORT) to run it on."""
    data = read_text(text)
    n_seq, n_batch = batch_layout(ctx, batch)
    t0 = time.perf_counter()
    with Session(model, n_ctx=ctx, n_batch=n_batch, n_seq=n_seq, n_gpu_layers=n_gpu_layers,
                 threads=threads, rpc=rpc) as session:
        windows = split_windows(session.tokenize(data), ctx, chunks, text)
        total = total_sq = 0.0
        count = 0
        for logits, targets in scored_logits(session, windows, n_batch, "perplexity"):
            nll = token_nll(logits, targets, session.threads)
            total, total_sq, count = total + nll.sum(), total_sq + (nll * nll).sum(), count + len(nll)
    mean, stderr = mean_and_stderr(total, total_sq, count)
    ppl = float(np.exp(mean))
    return PerplexityResult(ppl, ppl * stderr, count, len(windows), ctx, time.perf_counter() - t0)


def report(result: PerplexityResult) -> str:
    return (f"PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f}  "
            f"({result.chunks} chunks of {result.ctx}, {result.tokens} tokens scored, {result.seconds:.1f} s)")
