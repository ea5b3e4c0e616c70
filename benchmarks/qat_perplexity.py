"""What exact grid ingestion saves: perplexity of SmolLM2's original Q4_1 GGUF, of the same model
exported to a float checkpoint and converted back with `--qat auto` (exact codes), and with
`--qat off` (re-quantized from the dequantized weights, as a plain converter would).

    python -m benchmarks.qat_perplexity [--chunks 40] [--text ../shared/corpus/emma.txt] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import table
from ggufkit import models
from ggufkit.convert.export_hf import export_hf
from ggufkit.convert.pipeline import convert
from ggufkit.runtime.perplexity import perplexity
from tests.quant_reference import identical_tensors

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(CORPUS / "emma.txt"))
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    original = models.fetch(models.SMOLLM2)
    rows = []
    with tempfile.TemporaryDirectory(dir=models.cache_dir()) as tmp:
        tmp = Path(tmp)
        hf = export_hf(original, tmp / "hf", dtype="float32")
        files = {"(a) original Q4_1": original,
                 "(b) convert --qat auto": convert(hf, tmp / "auto.gguf", out_type="Q4_1", qat=True),
                 "(c) convert --qat off": convert(hf, tmp / "off.gguf", out_type="Q4_1", qat=False)}
        for label, path in files.items():
            r = perplexity(path, args.text, chunks=args.chunks)
            rows.append({"file": label, "ppl": round(r.ppl, 4), "stderr": round(r.ppl_stderr, 4),
                         "identical_tensors": f"{identical_tensors(path, original)[0]:.1%}"})
    if args.json:
        print(json.dumps({"text": args.text, "chunks": args.chunks, "rows": rows}, indent=2))
    else:
        print(f"SmolLM2-135M-Instruct, {Path(args.text).name}, {args.chunks} windows of 512")
        print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
