"""`ggufkit bench` vs llama-bench and `ggufkit perplexity` vs llama-perplexity on the same GGUF,
threads and llama.cpp build (ggufkit runs on the tools' libllama through LLAMA_CPP_LIB_PATH), plus
generation speed against the memory-bandwidth bound (each generated token reads every weight once,
so tg t/s x weight bytes cannot exceed the machine's copy bandwidth).

    python -m benchmarks.runtime_speed [--model smollm2|gemma3 | --file X.gguf] [--threads 2] [--chunks 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import run_measured, table
from ggufkit import models
from ggufkit.gguffile.reader import read_header
from reference.llama_cpp import llama_tools


def copy_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Best bytes/s of a numpy array copy (a read and a write of every byte)."""
    src = np.ones(n_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def llama_bench(exe, model, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict:
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
                          "-r", str(reps), "-o", "json"], capture_output=True, text=True, check=True).stdout
    return {("pp" if r["n_prompt"] else "tg"): r for r in json.loads(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=sorted(models.MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=4, help="perplexity windows of 512 tokens")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/corpus/emma.txt"))
    ap.add_argument("--file", help="measure this GGUF instead of --model's shipped file (e.g. an F32 or Q4_K_M)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = Path(args.file) if args.file else models.fetch(models.MODELS[args.model])
    perplexity_exe, bench_exe = llama_tools("llama-perplexity", "llama-bench")

    # ggufkit on the very build the tools were compiled as (llama-cpp-python's LLAMA_CPP_LIB_PATH):
    # its own wheel's libllama, compiled by pip with other flags, was ~3% slower on decode alone
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(bench_exe.parent)}
    ours = json.loads(subprocess.run(
        [sys.executable, "-m", "ggufkit", "bench", str(model), "-p", "512", "-n", "128", "-r", str(args.reps),
         "-t", str(args.threads), "--json"], env=env, capture_output=True, text=True, check=True).stdout)
    ref = llama_bench(bench_exe, model, args.threads, 512, 128, args.reps)
    ppl_cmd = ["--chunks", str(args.chunks), "-t", str(args.threads), "-c", "512"]
    ours_ppl, _ = run_measured([sys.executable, "-m", "ggufkit", "perplexity", str(model), "--text", args.text,
                                *ppl_cmd], env=env)
    ref_ppl, _ = run_measured([str(perplexity_exe), "-m", str(model), "-f", args.text, *ppl_cmd])
    weight_bytes = sum(t.n_bytes for t in read_header(model).tensors)
    bandwidth = copy_bandwidth()

    rows = [
        {"measure": "pp512 t/s", "ggufkit": f"{ours['pp_tps']:.1f} ± {ours['pp_tps_sd']:.1f}",
         "llama.cpp": f"{ref['pp']['avg_ts']:.1f} ± {ref['pp']['stddev_ts']:.1f}",
         "ratio": f"{ours['pp_tps'] / ref['pp']['avg_ts']:.3f}"},
        {"measure": "tg128 t/s", "ggufkit": f"{ours['tg_tps']:.1f} ± {ours['tg_tps_sd']:.1f}",
         "llama.cpp": f"{ref['tg']['avg_ts']:.1f} ± {ref['tg']['stddev_ts']:.1f}",
         "ratio": f"{ours['tg_tps'] / ref['tg']['avg_ts']:.3f}"},
        {"measure": f"perplexity wall s ({args.chunks}x512)", "ggufkit": f"{ours_ppl:.1f}",
         "llama.cpp": f"{ref_ppl:.1f}", "ratio": f"{ours_ppl / ref_ppl:.3f}"},
        {"measure": "tg x weight bytes / copy bandwidth", "ggufkit": f"{ours['tg_tps'] * weight_bytes / bandwidth:.3f}",
         "llama.cpp": f"{ref['tg']['avg_ts'] * weight_bytes / bandwidth:.3f}", "ratio": ""},
    ]
    if args.json:
        print(json.dumps({"rows": rows, "weight_bytes": weight_bytes, "copy_bandwidth_gbs": bandwidth / 1e9,
                          "threads": args.threads}))
        return
    print(f"{model.name}: {weight_bytes / 1e6:.1f} MB of weights, {args.threads} threads, "
          f"numpy copy bandwidth {bandwidth / 1e9:.2f} GB/s")
    print(table(rows, ["measure", "ggufkit", "llama.cpp", "ratio"]))


if __name__ == "__main__":
    main()
