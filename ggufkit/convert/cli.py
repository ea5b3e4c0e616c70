"""CLI commands owned by convert: `convert` (checkpoint -> GGUF) and `export-hf` (GGUF -> checkpoint)."""

from __future__ import annotations

import argparse
import sys

from ggufkit.convert.writer import parse_size


def cmd_convert(args) -> int:
    from ggufkit.convert.pipeline import convert

    report = []
    out = convert(args.src, args.output, out_type=args.type, force=args.force,
                  allow_nonfinite=args.allow_nonfinite,
                  split_max_size=parse_size(args.split_max_size) if args.split_max_size else 0,
                  qat=args.qat == "auto", report=report)
    if report:
        exact = sum(r.exact for r in report)
        print(f"--qat: {exact}/{len(report)} tensors on the grid, written exactly", file=sys.stderr)
        for r in report:
            status = "exact" if r.exact else "not on the grid, quantized"
            print(f"  {r.name:40s} {r.qtype:5s} {status:27s} max error {r.max_error:.3g}", file=sys.stderr)
    print(out)
    return 0


def cmd_export_hf(args) -> int:
    from ggufkit.convert.export_hf import export_hf

    print(export_hf(args.model, args.outdir, dtype=args.dtype, force=args.force))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="Hugging Face safetensors checkpoint -> GGUF",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a Hugging Face checkpoint (local folder or hub repo id; single or sharded "
        "safetensors in F32/F16/BF16) to a GGUF file in one streaming pass.\n"
        "Supported: Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3, Gemma 3 (text).\n"
        "Norms and vectors stay F32; rows that do not fit a 32-block fall back to F16, as in llama.cpp.\n"
        "Quantization-aware-trained exports already on a Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 grid are carried over\n"
        "exactly (--qat auto), with a per-tensor report on stderr.",
        epilog="example: ggufkit convert ./SmolLM2-135M-Instruct -o smollm2-f16.gguf --type F16")
    p.add_argument("src", help="checkpoint folder, or hub repo id (uses the local cache; honours HF_HUB_OFFLINE)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path (written atomically)")
    p.add_argument("--type", default="F16", type=str.upper,
                   choices=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "AUTO"],
                   help="tensor type for the weight matrices (default: F16); AUTO picks the smallest block "
                   "type whose grid holds the checkpoint exactly (QAT / fake-quant exports), else F16/BF16")
    p.add_argument("--qat", default="auto", choices=["auto", "off"],
                   help="with a block type: write tensors whose every block already lies on the type's grid "
                   "with exactly those codes and scales (auto, default), or always re-quantize (off)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors containing NaN/Inf instead of failing")
    p.add_argument("--split-max-size", metavar="SIZE",
                   help="write shards of at most SIZE (e.g. 500M, 2G) in llama-gguf-split's layout")
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
