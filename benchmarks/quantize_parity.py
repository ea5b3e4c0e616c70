"""The full mixture matrix: `python -m benchmarks.quantize_parity [--models smollm2 gemma3] [--types ...]`.

For each model (F32), mixture, and without / with a llama-imatrix importance matrix: do ggufkit's
tensor types equal llama-quantize's (all tensors), and what fraction of the tensors are
byte-identical (where ggufkit.kquants has every type the mixture needs)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import table
from benchmarks.quantize_speed import CORPUS, f32_gguf
from ggufkit import models
from ggufkit.commands.quantize import quantize_gguf
from ggufkit.kquants import supported_types
from ggufkit.mixtures import MIXTURES
from reference.quantize import (ggufkit_types, identical_tensors, llama_imatrix, llama_quantize, needed_types,
                               reference_types)


def compare(model: Path, mixture: str, imatrix: Path | None, workdir: Path) -> dict:
    flags = ("--imatrix", str(imatrix)) if imatrix else ()
    ours_types = ggufkit_types(model, mixture, has_imatrix=imatrix is not None)
    ref_types = reference_types(model, mixture, *flags)
    types_ok = ours_types == ref_types
    missing = needed_types(ours_types) - set(supported_types())
    if missing:
        identical = f"n/a (no {','.join(sorted(t.name for t in missing))})"
    else:
        llama_quantize(model, workdir / "ref.gguf", mixture, *flags)
        quantize_gguf(model, workdir / "ours.gguf", mixture, imatrix=imatrix, force=True)
        identical = f"{identical_tensors(workdir / 'ours.gguf', workdir / 'ref.gguf')[0]:.1%}"
        (workdir / "ref.gguf").unlink()
    return {"mixture": mixture, "imatrix": "yes" if imatrix else "no",
            "types": "same" if types_ok else f"{sum(ours_types[n] != t for n, t in ref_types.items())} differ",
            "identical tensors": identical}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=sorted(models.MODELS))
    p.add_argument("--types", nargs="+", default=[m for m in MIXTURES if m not in ("F16", "BF16", "F32")])
    p.add_argument("--chunks", type=int, default=4, help="imatrix chunks of 512 tokens")
    args = p.parse_args(argv)
    for name in args.models:
        model = f32_gguf(name)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            imatrix = llama_imatrix(model, CORPUS / "prideprejudice.txt", work / "imatrix.gguf", 512, args.chunks)
            rows = []
            for m in args.types:
                for im in (None, imatrix) if m != "Q2_K_S" else (imatrix,):  # Q2_K_S needs one in both tools
                    rows.append(compare(model, m, im, work))
                    print(" ".join(rows[-1].values()), flush=True)  # progress: the full matrix takes a while
        print(f"\n{name}")
        print(table(rows, list(rows[0])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
