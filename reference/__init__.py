"""llama.cpp and ggml as the references ggufkit is tested and raced against (never ggufkit's
production path), shared by tests/ and benchmarks/, which import this package and never each other:
`llama_cpp` (ggml's C quantizer through ctypes, llama.cpp's source, tools and converter) and
`quantize` (llama-quantize and llama-imatrix runs, synthetic GGUFs, comparisons of GGUF files).
Imported from the repository root, as pytest and `python -m benchmarks.x` run."""

from __future__ import annotations

from typing import Callable

# Called with the name of each heavy resource where it is touched: "tools" (llama.cpp's source and
# what is built or run from it), "ggml" (its C library through ctypes), "torch". tests/conftest.py
# adds a check that the running test carries the marker of that name.
CHECKS: list[Callable[[str], None]] = []


def uses(resource: str) -> None:
    for check in CHECKS:
        check(resource)
