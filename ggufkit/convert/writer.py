"""Streaming, atomic GGUF writing on top of gguf's GGUFWriter: tensor infos are declared up front,
data is written one tensor at a time, shards follow llama-gguf-split's layout, and nothing appears
at the destination until every byte is written (temp folder beside it, then rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np

from ggufkit.errors import GgufkitError


def refuse_overwrite(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise GgufkitError("already exists (use --force to overwrite)", out)


@contextlib.contextmanager
def atomic_gguf(out: Path, arch: str, split_max_size: int = 0):
    """Yield a GGUFWriter whose file(s) land at `out` only if the block finishes without error.
    With splits, the shards are named as llama-gguf-split names them (OUT-00001-of-0000N.gguf);
    `writer.produced` lists the final paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = gguf.GGUFWriter(tmpdir / out.name, arch, split_max_size=split_max_size)
        yield writer
        writer.close()
        writer.produced = []
        for produced in sorted(tmpdir.iterdir()):
            os.replace(produced, out.parent / produced.name)
            writer.produced.append(out.parent / produced.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def declare(writer: gguf.GGUFWriter, name: str, data_shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
    """Register a tensor's info before any data exists; `data_shape` is the float shape (rows..., cols)."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    byte_shape = (*data_shape[:-1], data_shape[-1] // block * type_size)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def write_tensor_chunks(writer: gguf.GGUFWriter, chunks) -> int:
    """Write the next declared tensor from an iterable of uint8 row chunks, so a large tensor never has
    to sit in memory whole. Mirrors GGUFWriter.write_tensor_data (same padding, same shard routing),
    which only takes a complete array. Returns the bytes written."""
    file_id = next(i for i, tensors in enumerate(writer.tensors) if tensors)
    fout = writer.fout[file_id]
    info = writer.tensors[file_id].pop(next(iter(writer.tensors[file_id])))
    writer.write_padding(fout, fout.tell())
    n = 0
    for chunk in chunks:
        np.ascontiguousarray(chunk).tofile(fout)
        n += chunk.nbytes
    if n != info.nbytes:
        raise AssertionError(f"wrote {n} bytes for a tensor declared with {info.nbytes}")
    writer.write_padding(fout, n)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS
    return n


def parse_size(text: str) -> int:
    """'500M', '2G', '1000000' -> bytes (decimal units, as llama-gguf-split reads them)."""
    units = {"K": 1000, "M": 1000**2, "G": 1000**3}
    try:
        n = int(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else int(text)
    except ValueError:
        raise GgufkitError(f"invalid size {text!r} (expected e.g. 500M or 2G)") from None
    if n <= 0:
        raise GgufkitError(f"invalid size {text!r}: must be positive")
    return n
