"""Checkpoint -> Q4_K_M with an importance matrix from a calibration text, end to end:
`ggufkit convert --calibration` against llama.cpp's pipeline (convert_hf_to_gguf.py -> llama-imatrix
-> llama-quantize), same lossless intermediate type, text, window size and threads, one run each.
Each tool measures as much of the text as it does by default: llama-imatrix all of it, ggufkit its
first DEFAULT_CALIBRATION_CHUNKS windows (benchmarks.calibration_curve: more did not lower the
quantized model's KL divergence on held-out text).

    python -m benchmarks.pipeline_speed [--model smollm2] [--type Q4_K_M] [--method gptq|ggml] [--threads 2] [--json]

--method is ggufkit's (default: its default, gptq, which also collects the input Hessians); with ggml
the bytes are llama.cpp's, up to the imatrix's accumulation order.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import run_measured, table
from ggufkit import models
from ggufkit.gptq import DEFAULT_METHOD, METHODS
from ggufkit.commands.convert import DEFAULT_CALIBRATION, lossless_type
from reference.llama_cpp import llama_cpp_source, llama_tool
from reference.quantize import identical_tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=sorted(models.MODELS))
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--text", default=str(DEFAULT_CALIBRATION))
    ap.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t = str(args.threads)
    with tempfile.TemporaryDirectory(dir=models.cache_dir()) as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        run_measured([sys.executable, "-m", "ggufkit", "export-hf", str(models.fetch(models.MODELS[args.model])),
                      str(hf)])
        lossless = lossless_type(hf)
        steps = {
            "convert_hf_to_gguf": [sys.executable, str(llama_cpp_source() / "convert_hf_to_gguf.py"), str(hf),
                                   "--outfile", str(tmp / "ref-base.gguf"), "--outtype", lossless.lower()],
            "llama-imatrix": [str(llama_tool("llama-imatrix")), "-m", str(tmp / "ref-base.gguf"), "-f", args.text,
                              "-o", str(tmp / "ref.imatrix.gguf"), "-c", str(args.ctx), "--no-ppl", "-t", t],
            "llama-quantize": [str(llama_tool("llama-quantize")), "--imatrix", str(tmp / "ref.imatrix.gguf"),
                               str(tmp / "ref-base.gguf"), str(tmp / "ref.gguf"), args.type, t],
        }
        ref = {name: run_measured(cmd) for name, cmd in steps.items()}
        ref_s, ref_mb = sum(s for s, _ in ref.values()), max(mb for _, mb in ref.values())
        ours_s, ours_mb = run_measured([sys.executable, "-m", "ggufkit", "convert", str(hf), "-o",
                                        str(tmp / "ours.gguf"), "--type", args.type, "--calibration", args.text,
                                        "--calibration-ctx", str(args.ctx), "--threads", t, "--method", args.method])
        fraction, _ = identical_tensors(tmp / "ours.gguf", tmp / "ref.gguf")
    result = {"model": args.model, "type": args.type, "method": args.method, "intermediate": lossless,
              "threads": args.threads,
              "llama_cpp_steps_s": {k: round(s, 2) for k, (s, _) in ref.items()},
              "llama_cpp_s": round(ref_s, 2), "ggufkit_s": round(ours_s, 2), "time_ratio": round(ours_s / ref_s, 3),
              "llama_cpp_peak_mb": round(ref_mb), "ggufkit_peak_mb": round(ours_mb),
              "rss_ratio": round(ours_mb / ref_mb, 3), "identical_tensors": round(fraction, 4)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} -> {args.type}, imatrix on {Path(args.text).name} (ctx {args.ctx}), "
          f"{lossless} intermediate, {args.threads} threads")
    rows = [{"pipeline": f"llama.cpp ({' + '.join(f'{s:.1f}' for s, _ in ref.values())})",
             "seconds": f"{ref_s:.1f}", "peak MB": f"{ref_mb:.0f}"},
            {"pipeline": f"ggufkit convert --calibration --method {args.method}", "seconds": f"{ours_s:.1f}", "peak MB": f"{ours_mb:.0f}"}]
    print(table(rows, list(rows[0])))
    print(f"time ratio {ours_s / ref_s:.2f}x, peak RSS ratio {ours_mb / ref_mb:.2f}x; "
          f"{fraction:.1%} of tensors byte-identical to llama.cpp's")


if __name__ == "__main__":
    main()
