"""Importance matrices: the GGUF format llama-imatrix writes and llama-quantize --imatrix reads
(per weight `<name>.in_sum2`, the summed squared input activations per column and expert, and
`<name>.counts`, the tokens seen per expert; `imatrix.*` keys), and the legacy `.dat` format.

A GGUF imatrix may also carry the input Hessians (gguffile.hessian): `<owner>.hessian` tensors and
the `ggufkit.hessian.*` keys naming which weights share each; llama.cpp's loader reads only the
`.in_sum2`/`.counts` pairs, so such a file still works in llama-quantize.

What a quantizer uses is the mean squared activation per column: `Imatrix.weights(name)`, matched
to the tensors about to be quantized by `weights_for`."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ggufkit.errors import GgufkitError
from ggufkit.gguffile.hessian import Hessian
from ggufkit.gguffile.reader import read_header, tensor_data
from ggufkit.gguffile.writer import TensorOut, write_gguf

F32 = GGMLQuantizationType.F32
SUMS, COUNTS, HESSIAN = ".in_sum2", ".counts", ".hessian"
KEY_HESSIAN_WEIGHTS, KEY_HESSIAN_OWNERS = "ggufkit.hessian.weights", "ggufkit.hessian.owners"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class Entry:
    sums: np.ndarray  # float32 (n_mat, cols): one row per expert, a single row for dense weights
    counts: np.ndarray  # float32 (n_mat,): tokens accumulated per expert


@dataclass
class Imatrix:
    entries: dict[str, Entry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    # legacy .dat files store sums already divided by the token count and times `ncall` (counts)
    legacy: bool = False
    hessian: Hessian | None = None  # the input Hessians, where they were collected too

    def weights(self, name: str) -> np.ndarray:
        """Mean squared activation per column, experts concatenated: (n_mat * cols,) float32, as
        llama-quantize normalizes it (1 for experts that saw no token)."""
        e = self.entries[name]
        if self.legacy:
            ncall = np.float32(e.counts[0])
            return (e.sums / ncall if ncall > 0 else e.sums).ravel()
        counts = e.counts.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(counts > 0, e.sums / counts, np.float32(1)).astype(np.float32).ravel()


def read_imatrix(path) -> Imatrix:
    """Either format, told apart by the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        raise GgufkitError("no such imatrix file", path)
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    header = read_header(path, arrays=True)
    kv = header.metadata
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in kv]
    if missing:  # llama-quantize refuses these too
        raise GgufkitError(f"not an imatrix: missing metadata {', '.join(missing)}", path)
    tensors = {t.name: t for t in header.tensors}
    entries = {}
    for name in sorted(n[:-len(SUMS)] for n in tensors if n.endswith(SUMS)):
        sums, counts = tensors[name + SUMS], tensors.get(name + COUNTS)
        if counts is None:
            raise GgufkitError(f"entry {name!r} has sums but no counts", path)
        if sums.type != F32 or counts.type != F32:
            raise GgufkitError(f"entry {name!r}: sums and counts must be F32", path)
        n_mat = counts.n_elements
        if n_mat == 0 or sums.n_elements % n_mat:
            raise GgufkitError(f"entry {name!r}: {sums.n_elements} sums do not split into {n_mat} experts", path)
        # llama.cpp rounds the stored float counts to integers
        entries[name] = Entry(np.array(tensor_data(header, sums).view(np.float32)).reshape(n_mat, -1),
                              np.rint(np.array(tensor_data(header, counts).view(np.float32)).ravel()))
    orphans = [n for n in tensors if n.endswith(COUNTS) and n[:-len(COUNTS)] not in entries]
    if orphans:
        raise GgufkitError(f"tensor {orphans[0]!r} has no matching {SUMS}", path)
    if not entries:
        raise GgufkitError("imatrix has no entries", path)
    return Imatrix(entries, list(kv[KEY_DATASETS]), int(kv[KEY_CHUNK_COUNT]), int(kv[KEY_CHUNK_SIZE]),
                   hessian=_read_hessian(path, header, tensors, entries))


def _read_hessian(path: Path, header, tensors: dict, entries: dict[str, Entry]) -> Hessian | None:
    kv = header.metadata
    if KEY_HESSIAN_WEIGHTS not in kv:
        return None
    weights, owners = list(kv[KEY_HESSIAN_WEIGHTS]), list(kv.get(KEY_HESSIAN_OWNERS, []))
    if len(weights) != len(owners):
        raise GgufkitError(f"{KEY_HESSIAN_WEIGHTS} and {KEY_HESSIAN_OWNERS} differ in length", path)
    blocks = {}
    for weight, owner in zip(weights, owners):
        t = tensors.get(owner + HESSIAN)
        if t is None or t.type != F32 or len(t.shape) != 3 or t.shape[0] != t.shape[1]:
            raise GgufkitError(f"Hessian of {weight!r}: no square F32 tensor {owner + HESSIAN!r}", path)
        cols = t.shape[0] * t.shape[2]
        if weight not in entries or entries[weight].sums.shape != (1, cols):
            raise GgufkitError(f"Hessian of {weight!r} has {cols} columns, its imatrix entry does not", path)
        if owner not in blocks:
            blocks[owner] = np.array(tensor_data(header, t).view(np.float32)).reshape(tuple(reversed(t.shape)))
    return Hessian(blocks, dict(zip(weights, owners)))


def _read_legacy(path: Path) -> Imatrix:
    """int32 n_entries; per entry: int32 len, name, int32 ncall, int32 nval, float32[nval];
    then optionally int32 chunk count, int32 len, dataset name."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise GgufkitError("neither a GGUF nor a legacy .dat imatrix (truncated)", path)
        pos += size
        return struct.unpack_from(fmt, data, pos - size)

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise GgufkitError("neither a GGUF nor a legacy .dat imatrix (no entries)", path)
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0:
            raise GgufkitError("neither a GGUF nor a legacy .dat imatrix (bad name length)", path)
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise GgufkitError(f"legacy imatrix entry {name!r} has no values", path)
        sums = np.array(take(f"<{nval}f"), dtype=np.float32)[None, :]
        entries[name] = Entry(sums, np.array([ncall], dtype=np.float32))
    chunk_count, datasets = 0, []
    if pos + 8 <= len(data):  # the trailer is optional
        chunk_count, length = take("<ii")
        if 0 < length <= len(data) - pos:
            datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


def weights_for(imat: Imatrix, tensors: dict[str, tuple[int, ...]], path,
                allow_missing: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per-column weights for the tensors about to be quantized ({name: ne}, ggml order), and the
    names of those quantized without one (`allow_missing`).

    llama-imatrix never sees token_embd (a lookup, not a matmul) nor, by default, output.weight, so
    only a missing layer weight means the imatrix belongs to another model."""
    weights, problems = {}, []
    for name, ne in tensors.items():
        expected = ne[0] * (ne[2] if len(ne) > 2 else 1)
        if name not in imat.entries:
            if name.startswith("blk."):
                problems.append(f"{name} (no entry)")
            continue
        w = imat.weights(name)
        if w.size != expected:
            problems.append(f"{name} (imatrix has {w.size} values, tensor needs {expected})")
        elif not np.isfinite(w).all():
            raise GgufkitError(f"imatrix entry {name!r} contains NaN or Inf", path)
        else:
            weights[name] = w
    if problems and not allow_missing:
        raise GgufkitError(f"imatrix does not match this model: {problems[0]}"
                           f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''} "
                           "(is it from another model? --allow-missing quantizes those without it)", path)
    return weights, [p.split(" ")[0] for p in problems]


def add_provenance(w, imat: Imatrix, path) -> None:
    """The quantize.imatrix.* keys llama-quantize writes into a model quantized with `imat`."""
    # llama-quantize truncates these strings to 127 bytes (its KV override buffer)
    w.add_string("quantize.imatrix.file", str(path)[:127])
    if imat.datasets:
        w.add_string("quantize.imatrix.dataset", imat.datasets[0][:127])
    w.add_uint32("quantize.imatrix.entries_count", len(imat.entries))
    if imat.chunk_count > 0:
        w.add_uint32("quantize.imatrix.chunks_count", imat.chunk_count)


def write_imatrix(imatrix: Imatrix, out) -> Path:
    """The GGUF format, entries sorted by name, as llama-imatrix writes it."""
    if imatrix.legacy:
        raise ValueError("write_imatrix takes raw sums and counts, not a legacy imatrix")
    tensors = []
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        sums = np.ascontiguousarray(e.sums, dtype=np.float32)
        counts = np.asarray(e.counts, dtype=np.float32).reshape(-1, 1)
        # ggml drops trailing dimensions of 1: a dense weight's entry is stored 1-D
        for suffix, data in ((SUMS, sums), (COUNTS, counts)):
            data = data[0] if len(data) == 1 else data
            tensors.append(TensorOut(name + suffix, data.shape, F32, [data]))
    h = imatrix.hessian
    if h is not None:
        tensors += [TensorOut(owner + HESSIAN, blocks.shape, F32, [blocks]) for owner, blocks in sorted(h.blocks.items())]

    def metadata(w) -> None:
        w.add_type("imatrix")
        w.add_array(KEY_DATASETS, list(imatrix.datasets))
        w.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        w.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        if h is not None:
            w.add_array(KEY_HESSIAN_WEIGHTS, sorted(h.shares))
            w.add_array(KEY_HESSIAN_OWNERS, [h.shares[n] for n in sorted(h.shares)])

    return write_gguf(out, None, tensors, metadata, desc="imatrix")[0]
