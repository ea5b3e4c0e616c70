"""The one GGUF reader: a fast, strict parse of the header (metadata, tensor table), and each
tensor's bytes memory-mapped on demand (`tensor_data`).

llama.cpp crashes or floods stderr on a bad file, and gguf's own reader takes seconds on a large
vocabulary and cannot tell a truncated file from a corrupt one, so every command reads GGUF files
here and each problem becomes one GgufkitError line."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ggufkit.errors import GgufkitError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # relative to the start of the data section
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array (vocabulary, merges) only counted, when its values are not asked for."""
    type: GGUFValueType
    length: int


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    value_types: dict  # key -> (GGUFValueType, element type of an array or None)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def strings(self, n: int, keep: bool = True) -> list[str] | None:
        """The next n strings (or, without `keep`, just the position after them): a tight loop, as
        a 150k-entry vocabulary is walked on every load (a `string()` call per entry took 0.2 s)."""
        buf, pos, end, u64 = self.buf, self.pos, len(self.buf), struct.Struct("<Q").unpack_from
        out = [] if keep else None
        for _ in range(n):
            if pos + 8 > end:
                raise _Truncated
            start = pos + 8
            pos = start + u64(buf, pos)[0]
            if pos > end:
                raise _Truncated
            if keep:
                out.append(buf[start:pos].decode("utf-8", errors="replace"))
        self.pos = pos
        return out


def _value(cur: _Cursor, vtype: GGUFValueType, arrays: bool):
    """One metadata value and its array element type; arrays as lists only when `arrays`."""
    if vtype == GGUFValueType.STRING:
        return cur.string(), None
    if vtype == GGUFValueType.ARRAY:
        etype, length = GGUFValueType(cur.unpack("<I")), cur.unpack("<Q")
        if etype == GGUFValueType.ARRAY:
            raise ValueError("nested metadata arrays are not supported")
        if etype == GGUFValueType.STRING and arrays:
            return cur.strings(length), etype
        if etype == GGUFValueType.STRING:
            cur.strings(length, keep=False)
            return ArrayInfo(etype, length), etype
        fmt = _SCALAR[etype]
        raw = cur.take(length * struct.calcsize(fmt))
        return (list(struct.unpack(f"<{length}{fmt[1]}", raw)) if arrays else ArrayInfo(etype, length)), etype
    return cur.unpack(_SCALAR[vtype]), None


def _tensor(cur: _Cursor) -> TensorInfo:
    name = cur.string()
    shape = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
    qtype = GGMLQuantizationType(cur.unpack("<I"))
    offset = cur.unpack("<Q")
    n_elements = 1
    for d in shape:
        n_elements *= d
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_elements % block:
        raise ValueError(f"tensor {name}: {n_elements} elements is not a multiple of the {qtype.name} block")
    return TensorInfo(name, shape, qtype, offset, n_elements, n_elements // block * type_size)


def _parse(buf, path: Path, size: int, arrays: bool) -> GgufHeader:
    cur = _Cursor(buf)
    if cur.take(4) != MAGIC:
        raise GgufkitError("not a GGUF file (bad magic)", path)
    version = cur.unpack("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GgufkitError(f"unsupported GGUF version {version} (supported: 2, 3)", path)
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata, value_types = {}, {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = GGUFValueType(cur.unpack("<I"))
        metadata[key], etype = _value(cur, vtype, arrays)
        value_types[key] = (vtype, etype)
    tensors = [_tensor(cur) for _ in range(n_tensors)]
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = -(-cur.pos // align) * align
    return GgufHeader(path, version, metadata, tensors, data_offset, size, value_types)


def read_header(path, arrays: bool = False) -> GgufHeader:
    """Parse and validate `path`; raises GgufkitError (one line) if llama.cpp could not load it.
    Metadata arrays are read as lists with `arrays`, else only counted (ArrayInfo)."""
    path = Path(path)
    if not path.exists():
        raise GgufkitError("no such file", path)
    if not path.is_file():
        raise GgufkitError("not a regular file", path)
    size = path.stat().st_size
    if size < 4:
        raise GgufkitError(f"not a GGUF file ({size} bytes)", path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            header = _parse(buf, path, size, arrays)
        except _Truncated:
            raise GgufkitError(f"truncated GGUF: the header runs past the end of the file ({size} bytes)",
                               path) from None
        except (ValueError, UnicodeDecodeError, struct.error) as exc:  # unknown enum values, bad sizes
            raise GgufkitError(f"corrupt GGUF header: {exc}", path) from None
    # a tensor-less file (a vocabulary-only GGUF) may end before the data section's alignment padding
    needed = header.data_offset + max((t.offset + t.n_bytes for t in header.tensors), default=0)
    if header.tensors and needed > size:
        raise GgufkitError(f"truncated GGUF: {size} bytes, but its tensors need {needed}", path)
    return header


def tensor_data(header: GgufHeader, t: TensorInfo) -> np.ndarray:
    """A tensor's bytes as stored, memory-mapped: (rows, bytes per row), rows over every dimension but ne[0]."""
    block, type_size = GGML_QUANT_SIZES[t.type]
    return np.memmap(header.path, np.uint8, "r", offset=header.data_offset + t.offset,
                     shape=(t.n_elements // t.shape[0], t.shape[0] // block * type_size))
