"""`ggufkit demo`, the main job: the default model -> HF checkpoint -> Q4_K_M GGUF with an importance
matrix measured on the shipped calibration text, and a summary of what was made."""

from __future__ import annotations

from pathlib import Path

from ggufkit.commands.convert import convert_calibrated
from ggufkit.convert.export_hf import export_hf
from ggufkit.models import DEFAULT_MODEL, fetch
from ggufkit.runtime.inspect import describe, type_table


def demo(out) -> None:
    out = Path(out)
    src = fetch(DEFAULT_MODEL)
    print(f"default model: {src}")
    hf_dir = out / "SmolLM2-135M-Instruct-hf"
    export_hf(src, hf_dir, dtype="float32", force=True)
    print(f"exported HF checkpoint: {hf_dir}")
    gguf_path = out / "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    convert_calibrated(hf_dir, gguf_path, "Q4_K_M", force=True)
    print(f"converted to Q4_K_M with an imatrix from the calibration text: {gguf_path}")
    print(type_table(gguf_path))
    print(describe(gguf_path))
