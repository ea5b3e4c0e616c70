"""How many calibration tokens an importance matrix needs, in one run:
`python -m benchmarks.calibration_curve [--model smollm2] [--type Q4_K_M] [--eval-chunks 8]`.

The importance matrix comes from the first N windows of 512 tokens of the shipped calibration text
(ggufkit/data/calibration.txt; until issue 19 Pride and Prejudice, chapters 1-9), N doubling up to
the whole text (one imatrix pass: its running sums are read off at each N; imatrix_s is that share
of the pass); the F32 model is quantized with each, and without one. Every file is scored against
the F32 model's own log-probs on held-out text: another novel (emma.txt) and Python source (the
standard library's argparse.py), the same windows for every file. The curve says where more
calibration stops lowering the mean KL divergence.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

from benchmarks.common import table
from benchmarks.quantize_speed import CORPUS, f32_gguf
from ggufkit.commands.convert import DEFAULT_CALIBRATION
from ggufkit.commands.quantize import quantize_gguf
from ggufkit.gguffile.imatrix import write_imatrix
from ggufkit.runtime.imatrix import collect
from ggufkit.runtime.kld import compare, save_base_logits

EVAL_TEXTS = {"emma": CORPUS / "emma.txt", "code": Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--eval-chunks", type=int, default=8, help="512-token windows scored per text")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    model = f32_gguf(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bases = {name: save_base_logits(model, text, tmp / f"{name}.base", chunks=args.eval_chunks)
                 for name, text in EVAL_TEXTS.items()}
        counts = (1, 2, 4, 8, 16, 32, 64)
        partial = []
        t0 = time.perf_counter()
        whole = collect(model, [DEFAULT_CALIBRATION], on_windows=(counts, partial.append))
        seconds = time.perf_counter() - t0
        partial = [m for m in partial if m.chunk_count < whole.chunk_count] + [whole]
        for imat in [None, *partial]:
            windows = 0 if imat is None else imat.chunk_count
            row = {"windows": windows, "tokens": windows * 512,
                   "imatrix_s": round(seconds * windows / whole.chunk_count, 1)}
            out = tmp / "model.gguf"
            imatrix = None if imat is None else write_imatrix(imat, tmp / "imatrix.gguf")
            quantize_gguf(model, out, args.type, imatrix=imatrix, force=True)
            for name, base in bases.items():
                r = compare(out, base)
                row[f"kld_{name}"] = f"{r.kld_mean:.5f} ± {r.kld_stderr:.5f}"
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{args.model} {args.type}: imatrix from the first N windows of {DEFAULT_CALIBRATION.name}, "
              f"KL divergence from F32 on {args.eval_chunks} windows of each held-out text")
        print(table(rows, ["windows", "tokens", "imatrix_s", "kld_emma", "kld_code"]))


if __name__ == "__main__":
    main()
