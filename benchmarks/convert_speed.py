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

from benchmarks.common import race_converters, run_measured, table
from ggufkit import models
from ggufkit.convert.checkpoint import open_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", choices=sorted(models.MODELS))
    ap.add_argument("--types", nargs="+", default=["BF16", "Q8_0"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=models.cache_dir()) as tmp:
        tmp = Path(tmp)
        # In a child: this process must stay small, as a child's peak RSS counts its parent's at fork.
        hf = tmp / "hf"
        run_measured([sys.executable, "-m", "ggufkit", "export-hf", str(models.fetch(models.MODELS[args.model])), str(hf)])
        largest = max(t.end - t.start for t in open_checkpoint(hf).tensors.values()) / 2**20
        rows = race_converters(hf, args.types, tmp)
    if args.json:
        print(json.dumps({"model": args.model, "largest_tensor_mb": round(largest), "rows": rows}, indent=2))
    else:
        print(f"model: {args.model} (exported to float32; largest tensor {largest:.0f} MB)")
        print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
