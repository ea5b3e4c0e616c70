"""`ggufkit kld`: KL divergence of a model from a base model, as `llama-perplexity --kl-divergence`.

The base model is run once over the perplexity windows and its log-probabilities are stored in
llama.cpp's own base-logits file format (so files are interchangeable with
`llama-perplexity --kl-divergence-base`): per scored token, a float32 scale and offset and one
uint16 per vocabulary entry, covering the top 16 nats of the distribution. The model is then run
over the same windows and compared token by token."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufkit.errors import GgufkitError
from ggufkit.gguffile.reader import read_header
from ggufkit.runtime.load import Session
from ggufkit.runtime.perplexity import (DEFAULT_BATCH, DEFAULT_CTX, batch_layout, mean_and_stderr, read_text,
                                        scored_logits, split_windows)

MAGIC = b"_logits_"
LOG_PROB_RANGE = 16.0  # nats below the top token that the uint16 codes cover, as llama.cpp


def row_width(n_vocab: int) -> int:
    """uint16 per stored token: scale and offset (two float32), then the vocabulary, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _log_sum_exp(logits: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """float32 log of a float64 sum of float32 exps, llama.cpp's precision."""
    return np.log(np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)


def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """(rows, row_width) uint16 codes of log softmax(logits), as llama.cpp's perplexity tool writes them."""
    rows, n_vocab = logits.shape
    peak = logits.max(axis=1)
    floor = np.maximum(logits.min(axis=1), peak - np.float32(LOG_PROB_RANGE))
    scale = (peak - floor) / np.float32(65535)
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    out = np.zeros((rows, row_width(n_vocab)), dtype=np.uint16)
    out[:, :4] = np.stack([scale, floor - peak - _log_sum_exp(logits, peak)], axis=1).view(np.uint16)
    codes = np.rint(inv[:, None] * (logits - floor[:, None]))
    out[:, 4:4 + n_vocab] = np.where(logits > floor[:, None], codes, 0)
    return out


class BaseLogits:
    """A base-logits file: its header, the windows it was computed on, and per-window codes."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise GgufkitError("no such base-logits file", path)
        with open(self.path, "rb") as f:
            head = f.read(20)
        if len(head) < 20 or head[:8] != MAGIC:
            raise GgufkitError("not a base-logits file (from ggufkit kld --save-base or "
                               "llama-perplexity --kl-divergence-base)", path)
        self.n_ctx, self.n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, "<i4", 3, 8))
        self.per_window = self.n_ctx - 1 - self.n_ctx // 2
        codes_at = 20 + 4 * n_chunk * self.n_ctx
        expected = codes_at + 2 * n_chunk * self.per_window * row_width(self.n_vocab)
        if self.path.stat().st_size != expected:
            raise GgufkitError(f"truncated or corrupt base-logits file: {self.path.stat().st_size} bytes, "
                               f"expected {expected}", path)
        self.windows = np.fromfile(self.path, "<i4", n_chunk * self.n_ctx, offset=20).reshape(n_chunk, self.n_ctx)
        self.codes = np.memmap(self.path, np.uint16, "r", codes_at,
                               (n_chunk, self.per_window, row_width(self.n_vocab)))


def save_base_logits(base, text, out, ctx: int = DEFAULT_CTX, chunks: int | None = None,
                     batch: int = DEFAULT_BATCH, n_gpu_layers: int = 0, threads: int | None = None,
                     rpc=None) -> Path:
    """Run `base` over the perplexity windows of `text`; write its log-probs to `out`."""
    data = read_text(text)
    n_seq, n_batch = batch_layout(ctx, batch)
    out = Path(out)
    with Session(base, n_ctx=ctx, n_batch=n_batch, n_seq=n_seq, n_gpu_layers=n_gpu_layers,
                 threads=threads, rpc=rpc) as session, open(out, "wb") as f:
        windows = split_windows(session.tokenize(data), ctx, chunks, text)
        f.write(MAGIC + np.array([ctx, session.n_vocab, len(windows)], "<i4").tobytes())
        f.write(windows.astype("<i4").tobytes())
        for logits, _ in scored_logits(session, windows, n_batch, "kld base"):
            f.write(quantize_log_probs(logits).tobytes())
    return out


class KldStats:
    """Running sums over scored tokens, llama.cpp's kl_divergence_result."""

    def __init__(self):
        self.sums = dict.fromkeys(("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2",
                                   "dp2", "dp4"), 0.0)
        self.same_top = self.count = 0
        self.kld_values: list[np.ndarray] = []

    def add(self, logits: np.ndarray, targets: np.ndarray, codes: np.ndarray) -> None:
        rows, n_vocab = logits.shape
        idx = np.arange(rows)
        header = np.ascontiguousarray(codes[:, :4]).view(np.float32)
        scale, offset = header[:, :1], header[:, 1:2]
        log_p_base = scale * codes[:, 4:4 + n_vocab] + offset
        peak = logits.max(axis=1)
        log_norm = peak + _log_sum_exp(logits, peak)
        nll = log_norm - logits[idx, targets]
        nll_base = -log_p_base[idx, targets]
        kept = log_p_base > -LOG_PROB_RANGE
        terms = np.where(kept, np.exp(log_p_base) * (log_p_base - logits + log_norm[:, None]), 0)
        kld = terms.sum(axis=1, dtype=np.float64)
        dp = np.exp(-nll) - np.exp(-nll_base)
        nll, nll_base, dp2 = nll.astype(np.float64), nll_base.astype(np.float64), dp.astype(np.float64) ** 2
        for key, values in (("nll", nll), ("nll2", nll * nll), ("nll_base", nll_base),
                            ("nll_base2", nll_base * nll_base), ("nll_nll_base", nll * nll_base),
                            ("kld", kld), ("kld2", kld * kld), ("dp2", dp2), ("dp4", dp2 * dp2)):
            self.sums[key] += float(values.sum())
        self.same_top += int(np.count_nonzero(logits.argmax(axis=1) == log_p_base.argmax(axis=1)))
        self.count += rows
        self.kld_values.append(kld)

    def result(self, chunks: int, ctx: int, seconds: float) -> "KldResult":
        s, n = self.sums, self.count
        log_ppl, log_ppl_err = mean_and_stderr(s["nll"], s["nll2"], n)
        log_base, log_base_err = mean_and_stderr(s["nll_base"], s["nll_base2"], n)
        cov = (s["nll_nll_base"] / n - log_ppl * log_base) / (n - 1)
        kld_mean, kld_err = mean_and_stderr(s["kld"], s["kld2"], n)
        mse, mse_err = mean_and_stderr(s["dp2"], s["dp4"], n)
        top = self.same_top / n
        values = np.concatenate(self.kld_values)
        return KldResult(
            kld_mean=kld_mean, kld_stderr=kld_err, kld_median=float(np.median(values)),
            kld_p99=float(np.percentile(values, 99)), kld_max=float(values.max()),
            top1_agreement=top, top1_stderr=float(np.sqrt(top * (1 - top) / (n - 1))),
            ppl_model=float(np.exp(log_ppl)), ppl_model_stderr=float(np.exp(log_ppl) * log_ppl_err),
            ppl_base=float(np.exp(log_base)), ppl_base_stderr=float(np.exp(log_base) * log_base_err),
            ln_ppl_ratio=log_ppl - log_base,
            ln_ppl_ratio_stderr=float(np.sqrt(max(log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov, 0.0))),
            rms_dp=float(np.sqrt(mse)), rms_dp_stderr=float(0.5 / np.sqrt(mse) * mse_err) if mse > 0 else 0.0,
            tokens=n, chunks=chunks, ctx=ctx, seconds=seconds)


@dataclass
class KldResult:
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float  # fraction of tokens where both models' most likely token is the same
    top1_stderr: float
    ppl_model: float
    ppl_model_stderr: float
    ppl_base: float
    ppl_base_stderr: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    rms_dp: float  # RMS of the change in the probability of the actual next token
    rms_dp_stderr: float
    tokens: int
    chunks: int
    ctx: int
    seconds: float


def compare(model, base_logits, chunks: int | None = None, batch: int = DEFAULT_BATCH, n_gpu_layers: int = 0,
            threads: int | None = None, stats: KldStats | None = None, rpc=None) -> KldResult:
    """KL divergence of `model` from the base log-probs stored in `base_logits`. `stats`, when given,
    is filled in place (its `kld_values` keep the per-token divergences, for paired comparisons)."""
    t0 = time.perf_counter()
    ref = BaseLogits(base_logits)
    n_chunk = len(ref.windows) if chunks is None else min(chunks, len(ref.windows))
    n_seq, n_batch = batch_layout(ref.n_ctx, batch)
    stats = KldStats() if stats is None else stats
    with Session(model, n_ctx=ref.n_ctx, n_batch=n_batch, n_seq=n_seq, n_gpu_layers=n_gpu_layers,
                 threads=threads, rpc=rpc) as session:
        if session.n_vocab != ref.n_vocab:
            raise GgufkitError(f"vocabulary of {session.n_vocab} tokens, but the base logits have "
                               f"{ref.n_vocab}", model)
        windows = ref.windows[:n_chunk]
        for k, (logits, targets) in enumerate(scored_logits(session, windows, n_batch, "kld")):
            stats.add(logits, targets, ref.codes[k])
    return stats.result(n_chunk, ref.n_ctx, time.perf_counter() - t0)


def kld(base, model, text=None, ctx: int = DEFAULT_CTX, chunks: int | None = None, batch: int = DEFAULT_BATCH,
        save_base=None, base_logits=None, n_gpu_layers: int = 0, threads: int | None = None,
        rpc=None) -> KldResult:
    """KL divergence of `model` from `base` on `text`; or from stored `base_logits` (then base and
    text are not needed). `save_base` keeps the base log-probs for later runs; `rpc`: ggml-rpc-servers
    (HOST:PORT) to run both models on."""
    run = dict(batch=batch, n_gpu_layers=n_gpu_layers, threads=threads, rpc=rpc)
    if base_logits is not None:
        return compare(model, base_logits, chunks, **run)
    if base is None or text is None:
        raise GgufkitError("need a base model and a text, or stored base logits")
    read_header(model)  # a bad model must fail before the long base run, not after it
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ggufkit-kld-") as tmp:
        stored = save_base_logits(base, text, save_base or Path(tmp) / "base.logits", ctx, chunks, **run)
        result = compare(model, stored, **run)
    result.seconds = time.perf_counter() - t0
    return result


def report(r: KldResult) -> str:
    return "\n".join([
        f"PPL(model)                : {r.ppl_model:10.4f} ± {r.ppl_model_stderr:.4f}",
        f"PPL(base)                 : {r.ppl_base:10.4f} ± {r.ppl_base_stderr:.4f}",
        f"ln(PPL(model)/PPL(base))  : {r.ln_ppl_ratio:10.6f} ± {r.ln_ppl_ratio_stderr:.6f}",
        f"Mean KLD                  : {r.kld_mean:10.6f} ± {r.kld_stderr:.6f}"
        f"  (median {r.kld_median:.6f}, 99% {r.kld_p99:.6f}, max {r.kld_max:.6f})",
        f"Same top token            : {100 * r.top1_agreement:9.3f}% ± {100 * r.top1_stderr:.3f}%",
        f"RMS Δp                    : {100 * r.rms_dp:9.3f}% ± {100 * r.rms_dp_stderr:.3f}%",
        f"({r.chunks} chunks of {r.ctx}, {r.tokens} tokens scored, {r.seconds:.1f} s)",
    ])
