"""Quantization-aware training vs the best post-training file vs llama.cpp's, same types and size:
`python -m benchmarks.qat_quality [--mixtures Q2_K Q3_K_M Q4_K_M] [--steps 60] [--seq 256] [--batch 4]`.

On the off-grid SmolLM2 of benchmarks.method_quality (run that first: this reuses its folder, with
the F32 GGUF jittered by 0.1, the importance matrix with Hessians on Pride and Prejudice, and its
llama.cpp and gptq files): the F32 GGUF is exported to a checkpoint, `ggufkit qat` trains it onto
each mixture's grids on Pride and Prejudice starting from a post-training file (--start: gptq, or
gptq-budget, error feedback with the budget mixture in no more bytes than llama.cpp's: the best
post-training file; its types are kept), and every file is scored against the F32 model on
held-out texts (Emma; argparse.py), never on the training text."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.budget_quality import TEXTS, row, score
from benchmarks.common import table
from benchmarks.quantize_speed import CORPUS
from ggufkit import models
from ggufkit.commands.qat import qat_command
from ggufkit.convert.export_hf import export_hf
from ggufkit.gguffile.reader import read_header
from ggufkit.qat.train import Settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixtures", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M"])
    p.add_argument("--start", choices=["gptq", "gptq-budget"], default="gptq-budget")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--chunks", type=int, default=8, help="windows of 512 scored per text (as method_quality)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--folder", default=str(models.cache_dir() / "bench" / "method" / "smollm2-jitter0.1"),
                   help="benchmarks.method_quality's output for the model")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    f32, imatrix = folder / "f32-jitter.gguf", folder / "imatrix.gguf"
    bases = {text: folder / f"{text}-{args.chunks}.logits" for text in TEXTS}
    needed = [f32, imatrix, *bases.values()] + [folder / f"{kind}-{m}.gguf" for m in args.mixtures
                                                for kind in ("llama.cpp", "gptq", "gptq-budget-le")]
    if missing := [str(f) for f in needed if not f.exists()]:
        raise SystemExit(f"run benchmarks.method_quality first: missing {', '.join(missing)}")
    hf = folder / "hf"
    if not hf.exists():
        export_hf(f32, hf)
    n_params = sum(t.n_elements for t in read_header(f32).tensors)
    settings = Settings(steps=args.steps, lr=args.lr, seq=args.seq, batch=args.batch, eval_every=args.eval_every)
    rows, runs = [], {}
    for mixture in args.mixtures:
        starts = {"gptq": folder / f"gptq-{mixture}.gguf", "gptq-budget": folder / f"gptq-budget-le-{mixture}.gguf"}
        qat = folder / f"qat-{args.start}-{mixture}-s{args.steps}.gguf"
        t0 = time.perf_counter()
        report = qat_command(hf, qat, mixture, [CORPUS / "prideprejudice.txt"], settings, init=str(starts[args.start]),
                             imatrix=imatrix, threads=args.threads, force=True)
        runs[mixture] = {"seconds": time.perf_counter() - t0, "best_step": report.best_step,
                         "heldout_kl": report.heldout_kl, "tokens_per_s": report.tokens_per_s}
        for label, path in ((f"llama.cpp {mixture}", folder / f"llama.cpp-{mixture}.gguf"),
                            (f"gptq {mixture}", starts["gptq"]), (f"gptq+budget <= {mixture}", starts["gptq-budget"]),
                            (f"qat from {args.start} {mixture}", qat)):
            rows.append(row(label, path, n_params, score(path, bases, args.threads)))
        print(table(rows, list(rows[0])), f"\n{mixture}: {runs[mixture]}", flush=True)
    print(f"\nqat: {args.steps} steps of {args.batch}x{args.seq} tokens, lr {args.lr:g}; "
          f"{args.chunks} windows of 512 per text\n{table(rows, list(rows[0]))}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": runs, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
