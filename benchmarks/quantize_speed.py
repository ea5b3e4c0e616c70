"""`ggufkit imatrix` vs llama-imatrix and `ggufkit quantize` vs llama-quantize, same F32 GGUF, text and
imatrix: `python -m benchmarks.quantize_speed [--model smollm2] [--type Q4_K_M] [--chunks 4] [--repeat 3]`.

Both sides run as child processes (wall time includes start-up and model loading) with the same
thread count (ggufkit quantizes row chunks on that many threads). Also checks the outputs agree: imatrix
entries within 1e-3 relative, quantized tensors byte-identical."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import run_measured, table
from ggufkit import models
from ggufkit.gguffile.imatrix import read_imatrix
from reference.llama_cpp import llama_tool
from reference.quantize import identical_tensors

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


def f32_gguf(name: str) -> Path:
    """The model as an F32 GGUF (exported and converted once into the cache)."""
    from ggufkit.convert.export_hf import export_hf
    from ggufkit.convert.pipeline import convert

    root = models.cache_dir() / "bench"
    out = root / f"{name}-f32.gguf"
    if not out.exists():
        hf = export_hf(models.fetch(models.MODELS[name]), root / f"{name}-hf", force=True)
        convert(hf, out, out_type="F32")
    return out


def max_relative_difference(a: Path, b: Path) -> float:
    ia, ib = read_imatrix(a), read_imatrix(b)
    return max(float(np.max(np.abs(ia.entries[n].sums - e.sums) / np.maximum(np.abs(e.sums), 1e-30)))
               for n, e in ib.entries.items())


def _best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The fastest time and the highest peak memory of repeated runs."""
    return min(t for t, _ in runs), max(mb for _, mb in runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=sorted(models.MODELS))
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--text", default=str(CORPUS / "prideprejudice.txt"))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(models.cache_dir() / "bench"))
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each command, alternating; the best time and the highest peak memory kept (default 3)")
    args = p.parse_args(argv)
    model, out, t = f32_gguf(args.model), Path(args.out), str(args.threads)
    ggufkit = [sys.executable, "-m", "ggufkit"]
    runs = {
        "imatrix": (
            [str(llama_tool("llama-imatrix")), "-m", str(model), "-f", args.text, "-o", str(out / "ref.imatrix.gguf"),
             "-c", str(args.ctx), "--chunks", str(args.chunks), "--no-ppl", "-t", t],
            [*ggufkit, "imatrix", str(model), "--text", args.text, "-o", str(out / "ours.imatrix.gguf"), "--ctx",
             str(args.ctx), "--chunks", str(args.chunks), "--threads", t, "--force"]),
        f"quantize {args.type}": (
            [str(llama_tool("llama-quantize")), "--imatrix", str(out / "ref.imatrix.gguf"), str(model),
             str(out / "ref.gguf"), args.type, t],
            [*ggufkit, "quantize", str(model), str(out / "ours.gguf"), args.type, "--imatrix",
             str(out / "ref.imatrix.gguf"), "--force"]),
    }
    rows = []
    for step, (ref_cmd, ours_cmd) in runs.items():
        ref_runs, our_runs = [], []
        for _ in range(args.repeat):  # alternating, so both see the same machine
            ref_runs.append(run_measured(ref_cmd))
            our_runs.append(run_measured(ours_cmd))
        (ref_s, ref_mb), (ours_s, ours_mb) = _best(ref_runs), _best(our_runs)
        rows.append({"step": step, "llama.cpp s": f"{ref_s:.1f}", "ggufkit s": f"{ours_s:.1f}",
                     "ratio": f"{ours_s / ref_s:.2f}x", "llama.cpp MB": f"{ref_mb:.0f}",
                     "ggufkit MB": f"{ours_mb:.0f}"})
    print(f"{args.model} F32, {args.chunks} chunks of {args.ctx} tokens, {args.threads} threads")
    print(table(rows, list(rows[0])))
    worst = max_relative_difference(out / "ours.imatrix.gguf", out / "ref.imatrix.gguf")
    print(f"imatrix max relative difference: {worst:.2e}")
    fraction, differ = identical_tensors(out / "ours.gguf", out / "ref.gguf")
    print(f"{args.type}: {fraction:.1%} of tensors byte-identical" + (f" (differ: {differ[:5]})" if differ else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
