"""What exact grid ingestion saves, on SmolLM2.

1. Its original Q4_1 GGUF, the same model exported to a float checkpoint and converted back with
   `--qat auto` (exact codes), and with `--qat off` (re-quantized from the dequantized weights, as a
   plain converter would): perplexity and tensors identical to the original.
2. A QAT-style checkpoint made from its weights (every 32-block on a symmetric 4-bit grid, scale
   absmax/7 in fp16, codes -7..7), converted to Q4_0 with `--qat auto` and `--qat off`: KL divergence
   from the checkpoint's own F32 conversion (what re-quantization with ggml's max/-8 scale costs).

    python -m benchmarks.qat_perplexity [--chunks 40] [--text ../shared/corpus/emma.txt] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from benchmarks.common import table
from ggufkit import models
from ggufkit.convert.export_hf import export_hf
from ggufkit.convert.pipeline import convert
from ggufkit.runtime.kld import kld
from ggufkit.runtime.perplexity import perplexity
from reference.quantize import identical_tensors

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


def on_symmetric_grid(w: np.ndarray) -> np.ndarray:
    """Per 32-block: scale absmax/7 in fp16, codes -7..7 (a common QAT export; never the code -8)."""
    b = w.reshape(-1, 32)
    d = (np.abs(b).max(axis=1) / 7).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.nan_to_num(np.clip(np.rint(b / d[:, None]), -7, 7))
    return (d[:, None] * c).reshape(w.shape).astype(np.float32)


def qat_rows(hf: Path, tmp: Path, text: str, chunks: int) -> list[dict]:
    qat = tmp / "qat-hf"
    qat.mkdir()
    for f in hf.iterdir():
        if f.name != "model.safetensors":
            (qat / f.name).write_bytes(f.read_bytes())
    tensors = load_file(hf / "model.safetensors")
    save_file({k: on_symmetric_grid(v) if v.ndim == 2 else v for k, v in tensors.items()},
              qat / "model.safetensors", metadata={"format": "pt"})
    base = convert(qat, tmp / "qat-f32.gguf", out_type="F32")
    rows = []
    for label, exact in (("(d) QAT ckpt --qat auto Q4_0", True), ("(e) QAT ckpt --qat off Q4_0", False)):
        r = kld(base, convert(qat, tmp / f"qat-{exact}.gguf", out_type="Q4_0", qat=exact), text, chunks=chunks)
        rows.append({"file": label, "kld_vs_f32": round(r.kld_mean, 5), "top1": f"{r.top1_agreement:.2%}",
                     "ppl": round(r.ppl_model, 4), "ppl_f32": round(r.ppl_base, 4)})
    return rows


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
        grid_rows = qat_rows(hf, tmp, args.text, args.chunks)
    if args.json:
        print(json.dumps({"text": args.text, "chunks": args.chunks, "rows": rows, "qat_rows": grid_rows}, indent=2))
    else:
        print(f"SmolLM2-135M-Instruct, {Path(args.text).name}, {args.chunks} windows of 512")
        print(table(rows, list(rows[0])))
        print(table(grid_rows, list(grid_rows[0])))


if __name__ == "__main__":
    main()
