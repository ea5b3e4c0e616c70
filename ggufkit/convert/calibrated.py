"""`convert --calibration`: checkpoint -> quantized GGUF with an importance matrix measured on the
user's text, in one command: a lossless GGUF in a temp folder beside the output, the imatrix
collected from it by llama.cpp, then the checkpoint converted again straight to the mixture."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ggufkit.convert.checkpoint import open_checkpoint
from ggufkit.convert.pipeline import MIXTURE_TYPES, convert
from ggufkit.convert.writer import refuse_overwrite
from ggufkit.errors import GgufkitError

# Chapters 1-9 of Pride and Prejudice (Project Gutenberg, public domain): ~19k tokens, 36 windows of 512.
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"
# The lossless GGUF type for a checkpoint stored in each safetensors dtype.
LOSSLESS = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def lossless_type(src) -> str:
    """The GGUF float type that holds the checkpoint's largest tensor without rounding."""
    ckpt = open_checkpoint(src)
    largest = max(ckpt.tensors.values(), key=lambda t: t.end - t.start)
    return LOSSLESS.get(largest.dtype, "F32")


def convert_calibrated(src, out, out_type: str, texts=(), ctx: int = 512, chunks: int | None = None,
                       n_gpu_layers: int = 0, threads: int | None = None, force: bool = False,
                       **convert_kwargs) -> Path:
    """Convert `src` to the mixture `out_type` with an importance matrix measured on `texts` (paths;
    default: the shipped calibration text). Other keyword arguments go to `convert`."""
    from ggufkit.runtime.imatrix import collect

    out = Path(out)
    out_type = out_type.upper()
    if out_type not in MIXTURE_TYPES:
        raise GgufkitError(f"--calibration applies to llama.cpp's mixtures ({', '.join(MIXTURE_TYPES)}), "
                           f"not to --type {out_type}")
    refuse_overwrite(out, force)
    texts = [Path(t) for t in texts] or [DEFAULT_CALIBRATION]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ggufkit-calibrate-", dir=out.parent) as tmp:
        base = convert(src, Path(tmp) / "model.gguf", out_type=lossless_type(src),
                       allow_nonfinite=convert_kwargs.get("allow_nonfinite", False))
        imatrix = collect(base, texts, ctx=ctx, chunks=chunks, n_gpu_layers=n_gpu_layers, threads=threads)
        return convert(src, out, out_type=out_type, force=force, imatrix=imatrix, **convert_kwargs)
