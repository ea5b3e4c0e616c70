"""CLI commands owned by convert: `convert` (checkpoint -> GGUF) and `export-hf` (GGUF -> checkpoint)."""

from __future__ import annotations

import argparse

from ggufkit.convert.writer import parse_size


def cmd_convert(args) -> int:
    from ggufkit.convert.pipeline import convert

    out = convert(args.src, args.output, out_type=args.type, force=args.force,
                  allow_nonfinite=args.allow_nonfinite,
                  split_max_size=parse_size(args.split_max_size) if args.split_max_size else 0)
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
        "Norms and vectors stay F32; rows that do not fit Q8_0's 32-blocks fall back to F16, as in llama.cpp.",
        epilog="example: ggufkit convert ./SmolLM2-135M-Instruct -o smollm2-f16.gguf --type F16")
    p.add_argument("src", help="checkpoint folder, or hub repo id (uses the local cache; honours HF_HUB_OFFLINE)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path (written atomically)")
    p.add_argument("--type", default="F16", type=str.upper, choices=["F32", "F16", "BF16", "Q8_0"],
                   help="tensor type for the weight matrices (default: F16)")
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
