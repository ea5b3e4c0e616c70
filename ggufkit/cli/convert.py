"""`convert` (checkpoint -> GGUF) and `export-hf` (GGUF -> checkpoint)."""

from __future__ import annotations

import argparse

from ggufkit.cli.quantize import add_budget_arguments, add_method_argument
from ggufkit.cli.runtime import add_rpc_argument
from ggufkit.commands.convert import DEFAULT_CALIBRATION_CHUNKS
from ggufkit.gguffile.split import parse_size


def cmd_convert(args) -> int:
    from ggufkit.budget import parse_target
    from ggufkit.commands.convert import convert_command

    target = parse_target(args.target_size, args.target_bpw, args.match_size, args.type)
    print(convert_command(args.src, args.output, args.type, calibration=args.calibration, imatrix=args.imatrix,
                          calibration_ctx=args.calibration_ctx, calibration_chunks=args.calibration_chunks,
                          n_gpu_layers=args.n_gpu_layers, threads=args.threads, force=args.force,
                          allow_nonfinite=args.allow_nonfinite, qat=args.qat == "auto",
                          split_max_size=parse_size(args.split_max_size) if args.split_max_size else 0,
                          allow_missing=args.allow_missing, target=target, method=args.method, rpc=args.rpc))
    return 0


def cmd_export_hf(args) -> int:
    from ggufkit.convert.export_hf import export_hf

    print(export_hf(args.model, args.outdir, dtype=args.dtype, force=args.force))
    return 0


def register(sub) -> None:
    from ggufkit.convert.pipeline import OUT_TYPES

    p = sub.add_parser(
        "convert", help="Hugging Face safetensors checkpoint -> GGUF",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a Hugging Face checkpoint (local folder or hub repo id; single or sharded "
        "safetensors in F32/F16/BF16) to a GGUF file in one streaming pass.\n"
        "Supported: Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3, Gemma 3 (text).\n"
        "Norms and vectors stay F32; rows that do not fit a 32-block fall back to F16, as in llama.cpp.\n"
        "F32/F16/BF16/Q8_0 give every matrix that type, as llama.cpp's convert_hf_to_gguf.py does.\n"
        "The other types are llama-quantize's mixtures (Q4_K_M, Q5_K_S, Q4_1, ...), with its per-tensor\n"
        "rules, quantized in the same pass; --calibration measures an importance matrix on a text first\n"
        "(through llama.cpp, on a lossless temporary GGUF), --imatrix takes one from a file.\n"
        "Quantization-aware-trained exports already on a Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 grid are carried over\n"
        "exactly (--qat auto), with a per-tensor report on stderr.",
        epilog="examples:\n"
        "  ggufkit convert ./SmolLM2-135M-Instruct -o smollm2-f16.gguf --type F16\n"
        "  ggufkit convert ./SmolLM2-135M-Instruct -o smollm2-q4_k_m.gguf --type Q4_K_M --calibration\n"
        "  ggufkit convert ./SmolLM2-135M-Instruct -o smollm2-q4_k_m.gguf --type Q4_K_M --calibration my.txt\n"
        "  ggufkit convert ./SmolLM2-135M-Instruct -o smollm2-90m.gguf --type Q4_K_M --calibration --target-size 90M")
    p.add_argument("src", help="checkpoint folder, or hub repo id (uses the local cache; honours HF_HUB_OFFLINE)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path (written atomically)")
    p.add_argument("--type", default="F16", type=str.upper,
                   choices=OUT_TYPES, metavar="TYPE",
                   help=f"one of {', '.join(OUT_TYPES)} (default: F16); AUTO picks per tensor the smallest block "
                   "type whose grid holds it exactly (QAT / fake-quant exports), else F16/BF16")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix for a mixture type (GGUF from "
                   "`ggufkit imatrix` or llama-imatrix, or a legacy .dat)")
    p.add_argument("--calibration", nargs="*", metavar="TEXT", help="measure the importance matrix on these "
                   "text files first; with no file, on the shipped calibration text (English prose and dialogue, "
                   "Python code and documentation, nine other languages)")
    p.add_argument("--calibration-ctx", type=int, default=512, metavar="N",
                   help="tokens per calibration window (default: 512, as llama-imatrix)")
    p.add_argument("--calibration-chunks", type=int, metavar="N", default=DEFAULT_CALIBRATION_CHUNKS,
                   help=f"use at most N windows of the text (default {DEFAULT_CALIBRATION_CHUNKS}: more did not "
                   "lower the KL divergence in benchmarks.calibration_curve; 0: the whole text)")
    add_method_argument(p, "--calibration (or an --imatrix with Hessians)")
    p.add_argument("--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers offloaded while measuring the imatrix (-1: all)")
    p.add_argument("-t", "--threads", type=int, metavar="N", help="threads for the calibration run, and quantizing workers (default: all cores)")
    add_rpc_argument(p, "with --calibration: measure the importance matrix on these ggml-rpc-servers")
    p.add_argument("--allow-missing", action="store_true",
                   help="quantize tensors the imatrix has no entry for without one, instead of failing")
    p.add_argument("--qat", default="auto", choices=["auto", "off"],
                   help="with a block type: write tensors whose every block already lies on the type's grid "
                   "with exactly those codes and scales (auto, default), or always re-quantize (off)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors containing NaN/Inf instead of failing")
    p.add_argument("--split-max-size", metavar="SIZE",
                   help="write shards of at most SIZE (e.g. 500M, 2G) in llama-gguf-split's layout")
    add_budget_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export-hf", help="GGUF -> Hugging Face checkpoint folder",
        description="Dequantize a GGUF (llama, gemma3, qwen2, qwen3 architectures) into a Hugging Face "
        "checkpoint: config.json, model.safetensors (sharded past 5 GB), tokenizer files with the chat "
        "template, generation_config.json. llama.cpp's q/k row permutation is undone.")
    p.add_argument("model", help="input .gguf file")
    p.add_argument("outdir", help="output folder (created; written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype (default: float32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_export_hf)
