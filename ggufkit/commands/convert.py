"""`ggufkit convert`: checkpoint -> GGUF (convert's one streaming pass), and with --calibration
checkpoint -> quantized GGUF with an importance matrix measured on the user's text, in one command:
a lossless GGUF in a temp folder beside the output, the imatrix collected from it by llama.cpp
(runtime), then the checkpoint converted again straight to the mixture."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ggufkit.budget import describe
from ggufkit.convert.checkpoint import open_checkpoint
from ggufkit.convert.pipeline import MIXTURE_TYPES, convert
from ggufkit.errors import GgufkitError
from ggufkit.gptq import DEFAULT_METHOD, check_method
from ggufkit.gguffile.writer import refuse_overwrite
from ggufkit.runtime.imatrix import collect
from ggufkit.runtime.inspect import type_table

# Jane Austen's prose and dialogue interleaved with Python code, the Python tutorial and the Universal
# Declaration of Human Rights in nine other languages (public domain or freely licensed; built by
# tools/make_calibration.py, sources in the README): ~40k tokens of SmolLM2's, 77 windows of 512,
# every kind of text already in the first 16.
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"
# The lossless GGUF type for a checkpoint stored in each safetensors dtype.
LOSSLESS = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def lossless_type(src) -> str:
    """The GGUF float type that holds the checkpoint's largest tensor without rounding."""
    ckpt = open_checkpoint(src)
    largest = max(ckpt.tensors.values(), key=lambda t: t.end - t.start)
    return LOSSLESS.get(largest.dtype, "F32")


# Windows of the calibration text measured by default. The KL divergence of SmolLM2's Q4_K_M on
# held-out prose and code stops improving after one window of 512 tokens (benchmarks.calibration_curve
# on the former shipped text, Pride and Prejudice ch. 1-9: 0.0325 at 1 window, 0.0318-0.0325 from 4
# to 36); 16 leaves a wide margin for larger models, hold every kind of the shipped text, and cost a
# fifth of its 77 windows. 0 or None: the whole text.
DEFAULT_CALIBRATION_CHUNKS = 16


def convert_calibrated(src, out, out_type: str, texts=(), ctx: int = 512, chunks: int | None = DEFAULT_CALIBRATION_CHUNKS,
                       n_gpu_layers: int = 0, threads: int | None = None, force: bool = False,
                       method: str = DEFAULT_METHOD, rpc=None, **convert_kwargs) -> Path:
    """Convert `src` to the mixture `out_type` with an importance matrix measured on `texts` (paths;
    default: the shipped calibration text; measured on the ggml-rpc-servers `rpc` if given), rounded
    by `method` (METHODS). Other keyword arguments go to `convert`."""
    out = Path(out)
    out_type = out_type.upper()
    check_method(method)
    if out_type not in MIXTURE_TYPES:
        raise GgufkitError(f"--calibration applies to llama.cpp's mixtures ({', '.join(MIXTURE_TYPES)}), "
                           f"not to --type {out_type}")
    refuse_overwrite(out, force)
    texts = [Path(t) for t in texts] or [DEFAULT_CALIBRATION]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ggufkit-calibrate-", dir=out.parent) as tmp:
        base = convert(src, Path(tmp) / "model.gguf", out_type=lossless_type(src),
                       allow_nonfinite=convert_kwargs.get("allow_nonfinite", False))
        imatrix = collect(base, texts, ctx=ctx, chunks=chunks or None, n_gpu_layers=n_gpu_layers, threads=threads,
                          hessians=method == "gptq", rpc=rpc)
        # the model's quantize.imatrix.dataset names the text, not where it lay on this machine
        imatrix.datasets = [t.name for t in texts]
        return convert(src, out, out_type=out_type, force=force, imatrix=imatrix, method=method, **convert_kwargs)


def convert_command(src, out, out_type: str = "F16", calibration=None, imatrix=None, calibration_ctx: int = 512,
                    calibration_chunks: int | None = DEFAULT_CALIBRATION_CHUNKS, n_gpu_layers: int = 0, threads: int | None = None,
                    method: str = DEFAULT_METHOD, rpc=None, **convert_kwargs) -> Path:
    """What `ggufkit convert` does: `convert`, or `convert_calibrated` when `calibration` is a list
    of texts (empty: the shipped one); the --qat report, a budget's choices (`target`) and a mixture's
    type table go to stderr. Other keyword arguments go to `convert`."""
    out_type = out_type.upper()
    report, plans = [], []
    convert_kwargs["plans"] = plans
    if calibration is not None and imatrix is not None:
        raise GgufkitError("give --imatrix or --calibration, not both")
    if rpc and calibration is None:
        raise GgufkitError("--rpc runs the --calibration measurement; without --calibration it has nothing to do")
    if calibration is not None:
        out = convert_calibrated(src, out, out_type, calibration, ctx=calibration_ctx, chunks=calibration_chunks,
                                 n_gpu_layers=n_gpu_layers, threads=threads, report=report, method=method,
                                 rpc=rpc, **convert_kwargs)
    else:
        if out_type in MIXTURE_TYPES and imatrix is None:
            print(f"ggufkit: quantizing to {out_type} without an importance matrix "
                  "(--calibration [TEXT...] or --imatrix FILE give better quality)", file=sys.stderr)
        out = convert(src, out, out_type=out_type, imatrix=imatrix, report=report, method=method, **convert_kwargs)
    if report:
        exact = sum(r.exact for r in report)
        print(f"--qat: {exact}/{len(report)} tensors on the grid, written exactly", file=sys.stderr)
        for r in report:
            status = "exact" if r.exact else "not on the grid, quantized"
            print(f"  {r.name:40s} {r.qtype:5s} {status:27s} max error {r.max_error:.3g}", file=sys.stderr)
    for plan in plans:
        print(describe(plan), file=sys.stderr)
    if out_type in MIXTURE_TYPES and not convert_kwargs.get("split_max_size"):
        print(type_table(out), file=sys.stderr)
    return out
