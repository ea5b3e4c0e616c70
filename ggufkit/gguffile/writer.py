"""The one way ggufkit writes a GGUF (`write_gguf`), on top of gguf's GGUFWriter: tensor infos are
declared up front, data is streamed one tensor (and one chunk of rows) at a time, shards follow
llama-gguf-split's layout, and nothing appears at the destination until every byte is written (a
temp folder beside it, then a rename)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np

from ggufkit.errors import GgufkitError
from ggufkit.gguffile.reader import GgufHeader
from ggufkit.progress import bar


@dataclass
class TensorOut:
    """A tensor to write: its float shape (numpy order: rows..., cols), its type in the file, and its
    bytes as stored (or F32 values), a chunk of whole rows at a time."""
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    chunks: Iterable[np.ndarray]


class _Writer(gguf.GGUFWriter):
    """gguf's writer, packing a metadata array in one call instead of one call per element (a
    150k-entry vocabulary took 0.3 s of every write); the same bytes."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if (vtype != gguf.GGUFValueType.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE
                or not isinstance(val, (list, tuple)) or not val):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
        fmt = self._simple_value_packing.get(ltype)
        uniform = sub_type is not None or all(gguf.GGUFValueType.get_type(v) is ltype for v in val)
        if not uniform or (fmt is None and ltype != gguf.GGUFValueType.STRING):
            return super()._pack_val(val, vtype, add_vtype, sub_type)  # nested arrays, and gguf's errors
        head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
        if ltype == gguf.GGUFValueType.STRING:
            parts = []
            for v in val:
                encoded = v.encode("utf-8") if isinstance(v, str) else v
                parts += (len(encoded).to_bytes(8, "little"), encoded)
            return head + b"".join(parts)
        return head + struct.pack(f"<{len(val)}{fmt}", *val)


def refuse_overwrite(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise GgufkitError("already exists (use --force to overwrite)", out)


def write_gguf(out, arch: str | None, tensors: list[TensorOut], metadata: Callable[[gguf.GGUFWriter], None],
               split_max_size: int = 0, desc: str = "write") -> list[Path]:
    """Write `tensors` to `out` with the key/values `metadata` adds (it is called once the tensors
    are declared: gguf's size label counts their parameters). `arch` None writes no
    general.architecture (an imatrix is not a model). With `split_max_size`, shards are named as
    llama-gguf-split names them. Returns the paths written, first shard first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmpdir = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    lock = os.open(tmpdir, os.O_RDONLY)
    try:
        # held until the end: another run's leftover sweep must not take this folder for one
        fcntl.flock(lock, fcntl.LOCK_EX)
        w = _write_head(tmpdir / out.name, arch, tensors, metadata, split_max_size)
        total = 0
        with bar(total=len(tensors), desc=desc, unit="tensor") as pbar:
            for t in tensors:
                total += _write_chunks(w, t.chunks)
                pbar.set_postfix_str(f"{total / 1e6:.0f} MB")
                pbar.update(1)
        w.close()
        produced = []
        for path in sorted(tmpdir.iterdir()):
            os.replace(path, out.parent / path.name)
            produced.append(out.parent / path.name)
        return produced
    finally:
        os.close(lock)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _write_head(path: Path, arch: str | None, tensors: list[TensorOut], metadata: Callable[[gguf.GGUFWriter], None],
                split_max_size: int = 0) -> gguf.GGUFWriter:
    """A writer at `path` that has written the header, key/values and tensor infos, tensor data next."""
    # for an empty name gguf writes no general.architecture
    w = _Writer(path, arch or "", split_max_size=split_max_size)
    for t in tensors:
        _declare(w, t)
    metadata(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def data_offset(arch: str | None, tensors: list[TensorOut], metadata: Callable[[gguf.GGUFWriter], None]) -> tuple[int, int]:
    """(where the tensor data starts, the data alignment) in the one file `write_gguf` would write for
    the same arguments: the header, key/values and tensor infos, measured by writing just them (to a
    temp file). Tensor types do not change it (an info has a fixed size), so the whole file is this
    plus each tensor's bytes padded to the alignment (`padded`)."""
    with tempfile.TemporaryDirectory(prefix=".ggufkit-header-") as tmp:
        w = _write_head(Path(tmp) / "header.gguf", arch, tensors, metadata)
        end = w.fout[0].tell()
        w.close()
    return padded(end, w.data_alignment), w.data_alignment


def padded(n_bytes: int, alignment: int) -> int:
    return -(-n_bytes // alignment) * alignment


def tensor_bytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (numpy order: rows..., cols) stored as `qtype`."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def copy_metadata(w: gguf.GGUFWriter, header: GgufHeader, skip=()) -> None:
    """The header's key/values with their GGUF types, but general.architecture (the writer has its
    own) and the keys in `skip`; general.alignment also aligns the data written."""
    for key, value in header.metadata.items():
        if key == gguf.Keys.General.ARCHITECTURE or key in skip:
            continue
        vtype, sub = header.value_types[key]
        w.add_key_value(key, value, vtype, sub_type=sub)
        if key == gguf.Keys.General.ALIGNMENT:
            w.data_alignment = int(value)


def written_metadata(arch: str, metadata: Callable[[gguf.GGUFWriter], None]) -> dict:
    """The key/values `metadata` would write into a GGUF for `arch`, as plain values (the form the
    reader gives), without writing a file."""
    w = _Writer(None, arch)
    metadata(w)
    return {key: v.value for key, v in w.kv_data[0].items()}


def _declare(w: gguf.GGUFWriter, t: TensorOut) -> None:
    """Register a tensor's info before any of its data exists."""
    block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
    byte_shape = (*t.shape[:-1], t.shape[-1] // block * type_size)
    w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t.qtype)


def _write_chunks(w: gguf.GGUFWriter, chunks: Iterable[np.ndarray]) -> int:
    """Write the next declared tensor from its row chunks, so a large tensor never has to sit in
    memory whole. Mirrors GGUFWriter.write_tensor_data (same padding, same shard routing), which
    only takes a complete array. Returns the bytes written."""
    file_id = next(i for i, tensors in enumerate(w.tensors) if tensors)
    fout = w.fout[file_id]
    info = w.tensors[file_id].pop(next(iter(w.tensors[file_id])))
    w.write_padding(fout, fout.tell())
    n = 0
    for chunk in chunks:
        np.ascontiguousarray(chunk).tofile(fout)
        n += chunk.nbytes
    if n != info.nbytes:
        raise AssertionError(f"wrote {n} bytes for a tensor declared with {info.nbytes}")
    w.write_padding(fout, n)
    w.state = gguf.gguf_writer.WriterState.WEIGHTS
    return n


def _temp_prefix(out: Path) -> str:
    return f".{out.name}."


def _remove_leftovers(out: Path) -> None:
    """Remove the temp folders that runs writing `out` left behind when killed (the name mkdtemp
    gives with our prefix, holding nothing but `out` or its shards, and locked by no live run)."""
    name = re.compile(re.escape(_temp_prefix(out)) + r"[a-z0-9_]{8}")
    content = re.compile(re.escape(out.name) + "|" + re.escape(out.stem) + r"-\d{5}-of-\d{5}\.gguf")
    removed = []
    for folder in sorted(out.parent.iterdir()):
        if not name.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir() \
                or not all(content.fullmatch(p.name) and p.is_file() for p in folder.iterdir()):
            continue
        lock = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a run still writing it
        else:
            shutil.rmtree(folder)
            removed.append(folder)
        finally:
            os.close(lock)
    if removed:
        print(f"ggufkit: removed {', '.join(map(str, removed))}, left by an interrupted run", file=sys.stderr)
