"""`ggufkit convert` vs llama.cpp's convert_hf_to_gguf.py on the same checkpoint, in one run:
wall time and peak RSS ratios (goal: <= 0.7x time, <= 0.5x RSS, RSS < 2x largest tensor + 300 MB).

    python -m benchmarks.convert_speed [--model gemma3|smollm2] [--types BF16 Q8_0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import run_measured, table
from ggufkit import models
from ggufkit.convert.checkpoint import open_checkpoint
from reference.llama_cpp import llama_cpp_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", choices=sorted(models.MODELS))
    ap.add_argument("--types", nargs="+", default=["BF16", "Q8_0"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=models.cache_dir()) as tmp:
        tmp = Path(tmp)
        # In a child: this process must stay small, as a child's peak RSS counts its parent's at fork.
        hf = tmp / "hf"
        run_measured([sys.executable, "-m", "ggufkit", "export-hf", str(models.fetch(models.MODELS[args.model])), str(hf)])
        ckpt = open_checkpoint(hf)
        largest = max(t.end - t.start for t in ckpt.tensors.values()) / 2**20
        script = llama_cpp_source() / "convert_hf_to_gguf.py"
        for qtype in args.types:
            ours = run_measured([sys.executable, "-m", "ggufkit", "convert", str(hf), "-o", str(tmp / "o.gguf"),
                                 "--type", qtype, "--force"])
            ref = run_measured([sys.executable, str(script), str(hf), "--outfile", str(tmp / "r.gguf"),
                                "--outtype", qtype.lower()])
            rows.append({"type": qtype, "ours_s": round(ours[0], 2), "ref_s": round(ref[0], 2),
                         "time_ratio": round(ours[0] / ref[0], 3), "ours_rss_mb": round(ours[1]),
                         "ref_rss_mb": round(ref[1]), "rss_ratio": round(ours[1] / ref[1], 3),
                         "rss_budget_mb": round(2 * largest + 300)})
    if args.json:
        print(json.dumps({"model": args.model, "largest_tensor_mb": round(largest), "rows": rows}, indent=2))
    else:
        print(f"model: {args.model} (exported to float32; largest tensor {largest:.0f} MB)")
        print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
