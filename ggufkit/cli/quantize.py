"""`quantize` (GGUF -> quantized GGUF) and `imatrix` (importance matrix collection, the step before it)."""

from __future__ import annotations

import argparse

from ggufkit.cli.runtime import add_rpc_argument


def cmd_quantize(args) -> int:
    from ggufkit.budget import parse_target
    from ggufkit.commands.quantize import quantize_gguf, summary

    target = parse_target(args.target_size, args.target_bpw, args.match_size, args.type)
    result = quantize_gguf(args.input, args.output, args.type, imatrix=args.imatrix, tensor_types=args.tensor_type,
                           output_tensor_type=args.output_tensor_type,
                           token_embedding_type=args.token_embedding_type, pure=args.pure,
                           allow_requantize=args.allow_requantize, allow_missing=args.allow_missing, force=args.force,
                           target=target, method=args.method)
    print(summary(result))
    return 0


def cmd_imatrix(args) -> int:
    from ggufkit.runtime.imatrix import imatrix

    run = imatrix(args.model, args.text, args.output, ctx=args.ctx, chunks=args.chunks,
                  process_output=args.process_output, n_gpu_layers=args.n_gpu_layers, threads=args.threads,
                  force=args.force, hessians=args.hessian, rpc=args.rpc)
    print(f"{run.path}: {run.entries} entries from {run.chunks} chunks ({run.tokens} tokens) "
          f"in {run.seconds:.1f} s ({run.tokens / max(run.seconds, 1e-9):.0f} tokens/s)")
    return 0


def add_budget_arguments(p) -> None:
    """--target-size / --target-bpw / --match-size, shared by quantize and convert."""
    g = p.add_argument_group("byte budget (instead of the mixture's fixed rules)", "per tensor the stock type "
                             "(Q2_K..Q8_0, IQ4_XS, F16; legacy 32-block types where rows do not fit 256) that "
                             "minimises the imatrix-weighted quantization error of the whole model within the "
                             "budget; the mixture decides which tensors are quantized")
    g = g.add_mutually_exclusive_group()
    g.add_argument("--target-size", metavar="BYTES", help="largest output file, e.g. 80M, 1.2G or a byte count")
    g.add_argument("--target-bpw", metavar="BITS", help="largest tensor data in bits per weight, e.g. 4.5")
    g.add_argument("--match-size", nargs="?", const="", metavar="MIXTURE", help="no larger than the file llama.cpp's "
                   "MIXTURE (default: TYPE) makes from the same input")


def add_method_argument(p, what: str) -> None:
    """--method, shared by quantize and convert."""
    from ggufkit.gptq import DEFAULT_METHOD, METHODS

    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"how {what} is used (default: {DEFAULT_METHOD}): gptq quantizes each weight a block of "
                   "columns at a time and pushes the rounding error onto the columns not yet quantized, "
                   "through the input Hessians (same types and size, lower KL divergence); ggml writes "
                   "llama-quantize's bytes")


def register(sub) -> None:
    from ggufkit.mixtures import MIXTURES

    p = sub.add_parser(
        "quantize", help="GGUF -> quantized GGUF with llama.cpp's mixtures (Q4_K_M, Q8_0, ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize a GGUF (F32/F16/BF16, or quantized with --allow-requantize) as llama-quantize "
        "does: the same type for every tensor (more bits for attn_v/ffn_down in chosen layers, Q6_K output, "
        "norms kept F32), the same metadata, with ggufkit's own quantizers. Streamed tensor by tensor; the "
        "output appears only when complete.",
        epilog="examples:\n  ggufkit quantize model-f32.gguf model-q4_k_m.gguf Q4_K_M --imatrix imatrix.gguf\n"
        "  ggufkit quantize model-f32.gguf model-best.gguf Q4_K_M --imatrix imatrix.gguf --match-size\n"
        "  ggufkit quantize model-f32.gguf model-80m.gguf Q4_K_M --imatrix imatrix.gguf --target-size 80M")
    p.add_argument("input", metavar="IN.gguf")
    p.add_argument("output", metavar="OUT.gguf")
    p.add_argument("type", metavar="TYPE", help=f"mixture: {', '.join(MIXTURES)}")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (GGUF from `ggufkit imatrix` or "
                   "llama-imatrix, or a legacy .dat); from `ggufkit imatrix --hessian` it also carries the "
                   "input Hessians that --method gptq uses")
    add_method_argument(p, "an imatrix with Hessians")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="type for tensors whose name matches REGEX (first match wins; repeatable)")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="type for output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="type for token_embd.weight")
    p.add_argument("--pure", action="store_true", help="no mixture rules: every quantized tensor gets TYPE's "
                   "base type (rows that do not fit its block still fall back)")
    p.add_argument("--allow-requantize", action="store_true", help="accept already-quantized tensors as input")
    p.add_argument("--allow-missing", action="store_true", help="quantize layers the imatrix lacks (or has "
                   "with the wrong size) without it, and list them, instead of failing")
    add_budget_arguments(p)
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                   help="quantizing workers at once (default: one per core)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "imatrix", help="importance matrix of a model over a text, as llama-imatrix",
        description="Collect the importance matrix (mean squared input activation per column of every layer "
        "weight) by llama-imatrix's method: windows of --ctx tokens, each starting with BOS. Writes the GGUF "
        "imatrix format that `ggufkit quantize --imatrix` and llama-quantize read. Needs a text of at least "
        "2 x ctx tokens.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--text", "-f", required=True, nargs="+", metavar="FILE", help="calibration text(s), joined")
    p.add_argument("-o", "--output", default="imatrix.gguf", help="output file (default: imatrix.gguf)")
    p.add_argument("--ctx", "-c", type=int, default=512, help="tokens per chunk (default: 512)")
    p.add_argument("--chunks", type=int, default=None, help="chunks to process (default: the whole text)")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight")
    p.add_argument("--hessian", action="store_true", help="also collect each layer input's Hessian (sum of x x^T) "
                   "for `ggufkit quantize --method gptq`; llama-quantize still reads the file as a plain imatrix")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=0, help="layers to offload, -1 for all")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    add_rpc_argument(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_imatrix)
