"""`report` (what each quantization type costs, measured) and `calib-check` (is a calibration text a
good one)."""

from __future__ import annotations

import argparse
import json


def cmd_report(args) -> int:
    from ggufkit.commands.report import quant_report, render_text

    result = quant_report(args.src, args.text, args.output, types=args.types, calibration=args.calibration,
                          ctx=args.ctx, chunks=args.chunks, calibration_ctx=args.calibration_ctx,
                          calibration_chunks=args.calibration_chunks, bench_tokens=args.bench_tokens,
                          allow_requantize=args.allow_requantize, n_gpu_layers=args.n_gpu_layers,
                          threads=args.threads, force=args.force)
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    return 0


def cmd_calib_check(args) -> int:
    from ggufkit.commands.calib_check import calib_check, render_text

    result = calib_check(args.model, args.calibration, args.text, qtype=args.type, ctx=args.ctx, chunks=args.chunks,
                         calibration_ctx=args.calibration_ctx, calibration_chunks=args.calibration_chunks,
                         allow_requantize=args.allow_requantize, n_gpu_layers=args.n_gpu_layers,
                         threads=args.threads, tmp_dir=args.tmp_dir)
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    return 0


def _measure_options(p, default_chunks: int) -> None:
    p.add_argument("--text", "-f", action="append", required=True, metavar="EVAL",
                   help="evaluation text (repeatable); each needs at least 2 x ctx tokens")
    p.add_argument("--ctx", "-c", type=int, default=512, help="window size in tokens (default: 512)")
    p.add_argument("--chunks", type=int, default=default_chunks,
                   help=f"windows scored per text, 0 for the whole text (default: {default_chunks}; the base "
                   "log-probs take 2 bytes x vocabulary per scored token on disk while it runs)")
    p.add_argument("--calibration-ctx", type=int, default=512, metavar="N",
                   help="tokens per imatrix window (default: 512, as llama-imatrix)")
    p.add_argument("--calibration-chunks", type=int, metavar="N", help="use at most N windows of each calibration "
                   "text (default: all)")
    p.add_argument("--allow-requantize", action="store_true", help="accept an already-quantized GGUF as the base "
                   "(the KL divergence is then measured from it)")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=0, help="layers to offload, -1 for all (default: 0)")
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                   help="CPU threads, and quantizing workers (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub) -> None:
    from ggufkit.commands.report import DEFAULT_BENCH_TOKENS, DEFAULT_CHUNKS, DEFAULT_TYPES

    p = sub.add_parser(
        "report", help="what each quantization type costs: size, KL divergence, perplexity, speed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make a file per llama.cpp mixture from one model (a checkpoint or hub id, converted to\n"
        "F32/F16/BF16 first as `convert` does, or an F32/F16/BF16 GGUF) and measure each on every --text:\n"
        "file size, bits per weight, mean KL divergence from the unquantized model and same-top-token rate\n"
        "(as `ggufkit kld`), perplexity, generation tokens/s (a short `ggufkit bench`). The base model's\n"
        "log-probs are computed once per text and reused for every file. With --calibration, every file is\n"
        "quantized with the importance matrix measured on that text.\n"
        "Writes into DIR: the GGUF files (and the converted base, and imatrix.gguf), report.json (one row per\n"
        "file), report.png (size vs KL divergence, Pareto front marked), report.html (plot and table, one\n"
        "self-contained file). DIR appears only when everything is written.",
        epilog="example: ggufkit report ./SmolLM2-135M-Instruct --text emma.txt --text code.py "
        "--calibration prideprejudice.txt --types Q8_0,Q4_K_M,Q2_K -o smollm2-report")
    p.add_argument("src", metavar="SRC", help="checkpoint folder, hub repo id, or F32/F16/BF16 GGUF")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES), type=str.upper, metavar="T1,T2,...",
                   help=f"mixtures to make (default: {','.join(DEFAULT_TYPES)})")
    p.add_argument("--calibration", action="append", metavar="CAL",
                   help="text for an importance matrix used by every file (repeatable; default: none)")
    _measure_options(p, DEFAULT_CHUNKS)
    p.add_argument("--bench-tokens", type=int, default=DEFAULT_BENCH_TOKENS, metavar="N",
                   help=f"tokens generated for the speed figure, 0 to skip (default: {DEFAULT_BENCH_TOKENS})")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "calib-check", help="is a calibration text a good one? its imatrix vs none vs the default text's",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize MODEL to --type three times: with the importance matrix of --calibration CAL,\n"
        "without one, and with the one of the shipped calibration text (ggufkit/data/calibration.txt:\n"
        "English prose and dialogue, Python code and documentation, nine other languages). Score each\n"
        "on every --text by its mean KL divergence from the unquantized model (± its standard error,\n"
        "as llama-perplexity reports it), and say per text whether CAL's file is worse than an alternative\n"
        "by more than the noise (2 standard errors of the per-token differences: the files are scored on\n"
        "the same tokens). Give an in-domain text first, then texts of other domains. Nothing is kept.",
        epilog="example: ggufkit calib-check model-f16.gguf --calibration code.txt --text more-code.py "
        "--text emma.txt")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, hub repo id, or F32/F16/BF16 GGUF")
    p.add_argument("--calibration", required=True, action="append", metavar="CAL",
                   help="the calibration text to check (repeatable: joined)")
    p.add_argument("--type", default="Q4_K_M", type=str.upper, help="the mixture to compare (default: Q4_K_M)")
    _measure_options(p, DEFAULT_CHUNKS)
    p.add_argument("--tmp-dir", metavar="DIR", help="where the temporary files go (default: $TMPDIR)")
    p.set_defaults(func=cmd_calib_check)
