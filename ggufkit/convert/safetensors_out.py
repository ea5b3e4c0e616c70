"""Streaming safetensors writer: the header is computed from shapes alone, then tensors are written
one at a time, sharded past a size with the usual model.safetensors.index.json."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import numpy as np

DTYPE_NAMES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for name, shape in entries:
        n = int(np.prod(shape)) * itemsize
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    return shards + [current] if current else shards


def write_safetensors(folder: Path, entries: list[tuple[str, tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray], dtype: str, max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """`produce(name)` returns the tensor already in `dtype` (bf16 as raw uint16); called once per tensor."""
    st_dtype, itemsize = DTYPE_NAMES[dtype]
    shards = _shards(entries, itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = int(np.prod(shape)) * itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                data = np.ascontiguousarray(produce(name))
                assert data.shape == tuple(shape) and data.itemsize == itemsize, name
                data.tofile(f)
        total += offset
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [folder / n for n in names]
