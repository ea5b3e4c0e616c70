"""Argument parsing only: one module here per group of subcommands registers them, and each
subcommand calls one plain function in the layers below (commands, convert, runtime, models)."""

from __future__ import annotations

import argparse
import sys

from ggufkit import __version__
from ggufkit.cli import convert, models, qat, quantize, report, runtime
from ggufkit.errors import GgufkitError

# Modules exposing `register(subparsers)`, in the order `ggufkit --help` lists their commands.
COMMAND_MODULES = (convert, quantize, qat, runtime, report, models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ggufkit",
        description="Turn Hugging Face checkpoints into llama.cpp GGUF files, quantize them, "
        "and run and measure them locally.",
    )
    parser.add_argument("--version", action="version", version=f"ggufkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is not None and threads != 0:  # 0 means the default, as for llama.cpp
        from ggufkit.kquants import set_threads

        try:
            set_threads(threads)  # the quantizing threads; llama.cpp's get the same count
        except ValueError as exc:
            parser.error(f"--threads: {exc}")
    try:
        result = args.func(args)
    except GgufkitError as exc:
        print(f"ggufkit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ggufkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
