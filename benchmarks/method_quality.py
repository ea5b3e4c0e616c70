"""llama.cpp's rounding vs ggufkit's error feedback, at each mixture's size:
`python -m benchmarks.method_quality [--models smollm2 gemma3] [--mixtures Q4_K_M Q3_K_M Q2_K] [--jitter 0.1]
[--rows llama.cpp gptq gptq+budget]`.

Per model (the F32 GGUF of benchmarks.quantize_speed, taken off its source grid by --jitter, see
budget_quality.jittered), one pass over Pride and Prejudice (--imatrix-chunks windows of 512)
collects the importance matrix and the input Hessians (kept in the model's folder, imatrix.gguf, and
reused). Per mixture (any of llama.cpp's, the i-quant ones included): llama.cpp's file (`--method
ggml`: byte-identical to llama-imatrix + llama-quantize on the same text), ggufkit's error feedback
(`gptq`) with the mixture's types, and error feedback with the budget mixture in no more bytes
(`gptq+budget`), each scored against the F32 model on held-out texts (Emma; argparse.py), never on
the calibration text. --rows makes only some of them (llama.cpp's files are made once and kept)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.budget_quality import TEXTS, jittered, row, score
from benchmarks.common import table
from benchmarks.quantize_speed import CORPUS, f32_gguf
from ggufkit import budget, models
from ggufkit.commands.quantize import quantize_gguf
from ggufkit.gguffile.imatrix import write_imatrix
from ggufkit.gguffile.reader import read_header
from ggufkit.runtime.imatrix import collect
from ggufkit.runtime.kld import save_base_logits

ROWS = ("llama.cpp", "gptq", "gptq+budget")


def run_model(name: str, args) -> dict:
    out = Path(args.out) / (name if not args.jitter else f"{name}-jitter{args.jitter:g}")
    out.mkdir(parents=True, exist_ok=True)
    f32 = f32_gguf(name)
    if args.jitter:
        f32 = jittered(f32, out / "f32-jitter.gguf", args.jitter)
    times = {}
    imatrix_path = out / "imatrix.gguf"  # with the Hessians: llama-quantize ignores them
    if not imatrix_path.exists():
        t0 = time.perf_counter()
        imatrix = collect(f32, [CORPUS / "prideprejudice.txt"], ctx=512, chunks=args.imatrix_chunks,
                          threads=args.threads, hessians=True)
        times["collect imatrix + H"] = time.perf_counter() - t0
        write_imatrix(imatrix, imatrix_path)
    bases = {}
    for text, path in TEXTS.items():
        bases[text] = out / f"{text}-{args.chunks}.logits"
        if not bases[text].exists():
            part = bases[text].with_suffix(".part")
            save_base_logits(f32, path, part, ctx=512, chunks=args.chunks, threads=args.threads)
            part.rename(bases[text])
    n_params = sum(t.n_elements for t in read_header(f32).tensors)
    rows = []
    for mixture in args.mixtures:
        files = {
            f"llama.cpp {mixture}": dict(method="ggml"),
            f"gptq {mixture}": dict(method="gptq"),
            f"gptq+budget <= {mixture}": dict(method="gptq", target=budget.Target(match=mixture)),
        }
        for label, kwargs in files.items():
            if label.split()[0] not in args.rows:
                continue
            path = out / (label.replace(" ", "-").replace("<=", "le").replace("+", "-") + ".gguf")
            if kwargs["method"] != "ggml" or not path.exists():  # llama.cpp's bytes do not change
                t0 = time.perf_counter()
                quantize_gguf(f32, path, mixture, imatrix=imatrix_path, force=True, **kwargs)
                times[label] = time.perf_counter() - t0
            rows.append(row(label, path, n_params, score(path, bases, args.threads)))
            print(table(rows, list(rows[0])), flush=True)
    print(f"\n{out.name}: {args.chunks} windows of 512 per text\n{table(rows, list(rows[0]))}\n"
          + "\n".join(f"  {k}: {v:.1f} s" for k, v in times.items()), flush=True)
    return {"rows": rows, "seconds": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    p.add_argument("--mixtures", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    p.add_argument("--chunks", type=int, default=8, help="windows of 512 scored per text")
    p.add_argument("--imatrix-chunks", type=int, default=16)
    p.add_argument("--jitter", type=float, default=0.1, help="noise (x each row's RMS) that takes the weights off "
                   "their source grid; 0: the model as fetched")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="which files to make per mixture")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(models.cache_dir() / "bench" / "method"))
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    results = {name: run_model(name, args) for name in args.models}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
