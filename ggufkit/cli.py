"""Argument parsing only: each subcommand is registered by the module that owns it and calls one
plain function there."""

from __future__ import annotations

import argparse
import importlib
import sys

from ggufkit import __version__
from ggufkit.errors import GgufkitError

# Modules exposing `register(subparsers)`; one per user-facing step of the pipeline.
COMMAND_MODULES = [
    "ggufkit.convert.cli",
    "ggufkit.kquants.cli",
    "ggufkit.runtime.cli",
    "ggufkit.models",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ggufkit",
        description="Turn Hugging Face checkpoints into llama.cpp GGUF files, quantize them, "
        "and run and measure them locally.",
    )
    parser.add_argument("--version", action="version", version=f"ggufkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ggufkit.kquants.api import worker_processes

    # the console script and `python -m ggufkit` guard their main module, as spawned workers need;
    # --threads 0 means the default, as for llama.cpp
    try:
        worker_processes(count=getattr(args, "threads", None) or None)
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


if __name__ == "__main__":
    raise SystemExit(main())
