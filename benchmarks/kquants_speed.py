"""Our quantizers against ggml's C, in the same run: `python -m benchmarks.kquants_speed [--types ...]`.

For every registered type, without and with an imatrix, on a 4096x4096 Gaussian matrix and on a real
weight matrix (Gemma 3 270M blk.0.ffn_down, 640x2048, dequantized from its GGUF). ggml runs with one
thread per core over row chunks (ctypes releases the GIL); ours runs as the library does (compiled
kernels on row chunks, one thread per core; compiled before timing). Times are the best of
--repeat runs. `identical` is the fraction of rows whose bytes match.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ggufkit.kquants import qtype_of, quantize, supported_types
from ggufkit.models import GEMMA3, fetch
from reference.llama_cpp import ggml_lib, ggml_quantize
from reference.quantize import real_matrix

REAL = (GEMMA3, "blk.0.ffn_down.weight")


def ggml_threaded(x: np.ndarray, qtype, imatrix, pool: ThreadPoolExecutor, threads: int) -> np.ndarray:
    bounds = np.linspace(0, x.shape[0], threads + 1).astype(int)
    parts = pool.map(lambda se: ggml_quantize(x, qtype, imatrix, se[0], se[1] - se[0]),
                     zip(bounds[:-1], bounds[1:]))
    return np.concatenate(list(parts))


def best_time(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def run(types, repeat: int, show: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    datasets = {"gauss4096": rng.standard_normal((4096, 4096), dtype=np.float32),
                "gemma3.ffn_down": real_matrix(fetch(REAL[0]), REAL[1])}
    threads = os.cpu_count() or 1
    rows = []
    with ThreadPoolExecutor(threads) as pool:
        for qt in types:
            for data_name, x in datasets.items():
                imatrix = rng.exponential(size=x.shape[1]).astype(np.float32)
                for imat in (None, imatrix):
                    if imat is None and ggml_lib().ggml_quantize_requires_imatrix(int(qt)):
                        continue
                    quantize(x[:8], qt, imat)  # compiled (or loaded from the cache) before timing
                    t_ours, ours = best_time(lambda: quantize(x, qt, imat), repeat)
                    t_ggml, ref = best_time(lambda: ggml_threaded(x, qt, imat, pool, threads), repeat)
                    rows.append({"type": qt.name, "data": data_name, "imatrix": imat is not None,
                                 "ours_s": t_ours, "ggml_s": t_ggml, "ratio": t_ours / t_ggml,
                                 "identical": float((ours == ref).all(axis=1).mean()),
                                 "ggml_threads": threads})
                    if show:
                        print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    print(f"{r['type']:8} {r['data']:16} {'yes' if r['imatrix'] else 'no':7} {r['ours_s']:9.3f} "
          f"{r['ggml_s']:9.3f} {r['ratio']:7.2f} {r['identical']:10.4f}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", help="type names (default: every registered type)")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement, best kept (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = p.parse_args(argv)
    types = [qtype_of(t) for t in args.types] if args.types else supported_types()
    if not args.json:
        print(f"{'type':8} {'data':16} {'imatrix':7} {'ours_s':>9} {'ggml_s':>9} {'ratio':>7} {'identical':>10}")
    rows = run(types, args.repeat, show=not args.json)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
