"""`qat`: train a checkpoint onto its GGUF grids, then write exactly what was trained."""

from __future__ import annotations

import argparse
import json

from ggufkit.cli.quantize import add_budget_arguments
from ggufkit.commands.convert import DEFAULT_CALIBRATION_CHUNKS


def cmd_qat(args) -> int:
    from dataclasses import asdict

    from ggufkit.budget import parse_target
    from ggufkit.commands.qat import qat_command
    from ggufkit.qat.train import Settings

    settings = Settings(steps=args.steps, lr=args.lr, seq=args.seq, batch=args.batch, ce_weight=args.ce_weight,
                        eval_every=args.eval_every, heldout=args.heldout, device=args.device, seed=args.seed)
    target = parse_target(args.target_size, args.target_bpw, args.match_size, args.type)
    report = qat_command(args.src, args.output, args.type, args.text, settings, init=args.init, imatrix=args.imatrix,
                         target=target,
                         chunks=args.imatrix_chunks or None, threads=args.threads, force=args.force,
                         resume=args.resume)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        first, best = report.heldout_kl[0][1], dict(report.heldout_kl)[report.best_step]
        print(f"{report.output}: {report.type}, best held-out KL divergence {best:.5f} at step {report.best_step} "
              f"(start: {first:.5f}), {report.tokens_per_s:.0f} tokens/s over {report.train_seconds:.0f} s")
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value
    return parse


def register(sub) -> None:
    from ggufkit.commands.qat import INITS
    from ggufkit.convert.pipeline import MIXTURE_TYPES

    p = sub.add_parser(
        "qat", help="train a checkpoint onto its GGUF grids (quantization-aware), then write what was trained",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantization-aware training onto llama.cpp's block formats: every tensor the mixture\n"
        "quantizes is fake-quantized in the forward pass exactly as the file will store it (ggml's search\n"
        "with the importance matrix of the training text), gradients pass straight through inside the\n"
        "grid's range, and the model is distilled from the original (KL divergence of the next-token\n"
        "distributions). Training starts from the best post-training file (error feedback, --init gptq,\n"
        "with a byte budget where one is given), on that file's per-tensor types;\n"
        "a few windows of the text are held out and the state with the lowest held-out KL divergence is\n"
        "written, so the file is never worse there than where training started. The written file\n"
        "dequantizes to the trained fake-quantized weights bit for bit (checked before it is written);\n"
        "it loads in stock llama.cpp. Needs torch and transformers (pip install 'ggufkit[qat]').\n"
        "Ctrl-C saves the training state beside the output; --resume continues from it.",
        epilog="examples:\n"
        "  ggufkit qat ./SmolLM2-135M-Instruct -o smollm2-q3_k_m.gguf --type Q3_K_M --text train.txt\n"
        "  ggufkit qat ./SmolLM2-135M-Instruct -o smollm2-q2_k.gguf --type Q2_K --text a.txt b.txt --steps 400\n"
        "  ggufkit qat ./SmolLM2-135M-Instruct -o smollm2-q2_k.gguf --type Q2_K --text a.txt --resume smollm2-q2_k.gguf.qat-state")
    p.add_argument("src", help="checkpoint folder, or hub repo id (uses the local cache; honours HF_HUB_OFFLINE)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path (written atomically)")
    p.add_argument("--type", required=True, type=str.upper, choices=MIXTURE_TYPES, metavar="TYPE",
                   help=f"llama-quantize's mixture to train for: one of {', '.join(MIXTURE_TYPES)}")
    p.add_argument("--text", nargs="+", required=True, metavar="TEXT",
                   help="training text files (also the importance matrix's); evaluate on other texts")
    p.add_argument("--steps", type=_positive(int), default=200, help="optimizer steps (default 200)")
    p.add_argument("--lr", type=_positive(float), default=1e-5, help="Adam's learning rate (default 1e-5)")
    p.add_argument("--seq", type=_positive(int), default=256, help="tokens per training window (default 256)")
    p.add_argument("--batch", type=_positive(int), default=4, help="windows per step (default 4)")
    p.add_argument("--ce-weight", type=float, default=0.0, metavar="W",
                   help="add W x the next-token loss to the KL divergence (default 0: distillation only)")
    p.add_argument("--eval-every", type=_positive(int), default=25, metavar="N",
                   help="steps between held-out evaluations (default 25)")
    p.add_argument("--heldout", type=_positive(int), default=4, metavar="N",
                   help="windows at the end of the text kept out of training to pick the best state (default 4)")
    p.add_argument("--init", default="gptq", metavar="|".join(INITS) + "|FILE.gguf",
                   help="start from error feedback's file (gptq, default), from ggml's rounding of the checkpoint "
                   "(ggml), or from the weights of a GGUF of the same model (your best file so far)")
    add_budget_arguments(p)
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix to use (with Hessians for --init gptq: "
                   "`ggufkit imatrix --hessian`) instead of measuring one on the training text")
    p.add_argument("--imatrix-chunks", type=int, default=DEFAULT_CALIBRATION_CHUNKS, metavar="N",
                   help=f"windows of 512 of the text measured for the importance matrix (default "
                   f"{DEFAULT_CALIBRATION_CHUNKS}; 0: all)")
    p.add_argument("--device", default="cpu", help="torch device for training: cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the window order (default 0)")
    p.add_argument("--resume", metavar="DIR", help="continue from the state a Ctrl-C saved (OUTPUT.qat-state)")
    p.add_argument("-t", "--threads", type=int, metavar="N", help="threads for llama.cpp and the quantizers")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_qat)
