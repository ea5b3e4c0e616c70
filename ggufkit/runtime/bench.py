"""`ggufkit bench`: prompt-processing and generation speed, measured as llama-bench does.

pp: random tokens (BOS first) decoded in batches into a fresh context of n_prompt tokens.
tg: n_gen single-token decodes into a fresh context of n_gen tokens. Each test has one untimed
warm-up run, then `reps` timed runs; tokens/s are averaged over runs, with their sample sd."""

from __future__ import annotations

import ctypes
import functools
import statistics
import time
from dataclasses import dataclass

import numpy as np

from ggufkit.errors import GgufkitError
from ggufkit.progress import bar
from ggufkit.runtime.load import Session, ggml_library

DEFAULT_BATCH = 2048
DEFAULT_UBATCH = 512


@functools.lru_cache(maxsize=None)
def backend() -> str:
    """llama-bench's backend column: the non-CPU ggml backends compiled in, else CPU."""
    ggml = ggml_library("libggml.so")
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    names = [ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
             for i in range(ggml.ggml_backend_reg_count())]
    return ",".join(n for n in names if n != "CPU") or "CPU"


def _first_token(session: Session, rng: np.random.Generator) -> int:
    return session.bos if session.bos is not None else int(rng.integers(session.n_vocab))


def run_prompt(session: Session, n_prompt: int, rng: np.random.Generator) -> None:
    for start in range(0, n_prompt, session.n_batch):
        n = min(session.n_batch, n_prompt - start)
        tokens = rng.integers(session.n_vocab, size=n, dtype=np.int32)
        if start == 0:
            tokens[0] = _first_token(session, rng)
        session.decode(tokens, np.arange(start, start + n, dtype=np.int32), 0, np.arange(n) == n - 1)
    session.synchronize()


def run_gen(session: Session, n_gen: int, rng: np.random.Generator) -> None:
    token = _first_token(session, rng)
    for pos in range(n_gen):
        session.decode([token], [pos], 0, True)
        session.synchronize()
        token = int(rng.integers(session.n_vocab))


def _timed_tps(session: Session, run, n_tokens: int, n_warmup: int, reps: int, rng, progress) -> list[float]:
    run(session, n_warmup, rng)
    samples = []
    for _ in range(reps):
        session.clear()
        t0 = time.perf_counter()
        run(session, n_tokens, rng)
        samples.append(n_tokens / (time.perf_counter() - t0))
        progress.update()
    return samples


@dataclass
class BenchResult:
    model: str  # llama.cpp's description: architecture, size, type
    size_bytes: int
    params: int
    backend: str
    threads: int
    n_gpu_layers: int
    n_prompt: int
    n_gen: int
    reps: int
    pp_tps: float | None
    pp_tps_sd: float | None
    tg_tps: float | None
    tg_tps_sd: float | None


def _describe(session: Session) -> tuple[str, int, int]:
    lib = session.lib
    buf = ctypes.create_string_buffer(256)
    lib.llama_model_desc(session.model, buf, len(buf))
    return buf.value.decode(), lib.llama_model_size(session.model), lib.llama_model_n_params(session.model)


def _mean_sd(samples: list[float]) -> tuple[float | None, float | None]:
    if not samples:
        return None, None
    return statistics.fmean(samples), statistics.stdev(samples) if len(samples) > 1 else 0.0


def bench(model, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, threads: int | None = None,
          n_gpu_layers: int = 0, batch: int = DEFAULT_BATCH, ubatch: int = DEFAULT_UBATCH) -> BenchResult:
    """pp{n_prompt} and tg{n_gen} tokens/s of `model` (a GGUF path); a 0 skips that test."""
    if reps < 1 or n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0:
        raise GgufkitError("need reps >= 1 and at least one of n_prompt, n_gen > 0")
    rng = np.random.default_rng()
    # (test, tokens, batch, warm-up tokens): llama-bench warms generation up with a single token
    tests = [(run_prompt, n_prompt, min(batch, n_prompt), n_prompt), (run_gen, n_gen, 1, 1)]
    samples: dict = {}
    with bar(total=reps * sum(t[1] > 0 for t in tests), desc="bench", unit="run") as progress:
        for run, n_tokens, n_batch, n_warmup in tests:
            if n_tokens == 0:
                continue
            with Session(model, n_ctx=n_tokens, n_batch=n_batch, n_ubatch=ubatch, n_gpu_layers=n_gpu_layers,
                         threads=threads) as session:
                samples[run] = _timed_tps(session, run, n_tokens, n_warmup, reps, rng, progress)
                desc, size, params = _describe(session)
                used_threads = session.threads
    pp, pp_sd = _mean_sd(samples.get(run_prompt, []))
    tg, tg_sd = _mean_sd(samples.get(run_gen, []))
    return BenchResult(desc, size, params, backend(), used_threads, n_gpu_layers, n_prompt, n_gen, reps,
                       pp, pp_sd, tg, tg_sd)


def report(r: BenchResult) -> str:
    """A llama-bench style markdown table."""
    head = f"| {r.model} | {r.size_bytes / 2**20:.2f} MiB | {r.params / 1e6:.2f} M | {r.backend} | {r.threads} |"
    lines = ["| model | size | params | backend | threads | test | t/s |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for name, n, tps, sd in (("pp", r.n_prompt, r.pp_tps, r.pp_tps_sd), ("tg", r.n_gen, r.tg_tps, r.tg_tps_sd)):
        if tps is not None:
            lines.append(f"{head} {name}{n} | {tps:.2f} ± {sd:.2f} |")
    return "\n".join(lines)
