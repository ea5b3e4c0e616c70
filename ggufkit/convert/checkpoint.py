"""Opening a checkpoint: a local folder or a hub repo id, its config, and memory-mapped tensors
across safetensors shards, read one at a time so memory tracks the largest tensor.

safetensors' own numpy API copies each tensor and has no bfloat16; reading the (simple, documented)
header ourselves lets us memory-map, convert BF16 exactly, and name the file and offset of a
corrupt header before anything is written."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggufkit.convert.packed import FORMATS, packed_format
from ggufkit.errors import GgufkitError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I32": np.int32, "I64": np.int64, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}

HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
             "special_tokens_map.json"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """BF16 is the upper half of an f32: widening is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def expert_slice(info: TensorInfo, e: int) -> TensorInfo:
    """Expert e of a tensor that stacks experts on its first axis: a contiguous byte range of it."""
    size = (info.end - info.start) // info.shape[0]
    return TensorInfo(f"{info.name}[{e}]", info.file, info.dtype, info.shape[1:], info.start + e * size,
                      info.start + (e + 1) * size)


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise GgufkitError("not a safetensors file (shorter than its 8-byte header length)", path)
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise GgufkitError(f"corrupt safetensors header: length {n} past the end of the {size}-byte file", path)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GgufkitError(f"corrupt safetensors header: {exc}", path) from None
    base = 8 + n
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise GgufkitError(f"corrupt safetensors header entry for {name!r}", path) from None
        if dtype not in _DTYPES:
            raise GgufkitError(f"tensor {name!r} has unsupported dtype {dtype}", path)
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != expected or begin < 0:
            raise GgufkitError(f"tensor {name!r}: data offsets {begin}..{end} do not match shape {list(shape)} {dtype}", path)
        if base + end > size:
            raise GgufkitError(f"truncated: tensor {name!r} ends at byte {base + end}, file has {size}", path)
        infos.append(TensorInfo(name, path, dtype, shape, base + begin, base + end))
    return infos


@dataclass
class Checkpoint:
    root: Path
    config: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    # Tensors computed from others (packed GPTQ/AWQ layers, one expert of a fused tensor): name ->
    # (its float32 values from its parts, the parts: name -> TensorInfo).
    packed: dict[str, tuple] = field(default_factory=dict)
    # Those whose parts already hold them in a ggml block type (MXFP4 experts): name -> (type, parts -> GGUF bytes).
    stored: dict[str, tuple] = field(default_factory=dict)
    _cache: tuple = (None, None)  # the last dequantized packed layer, read in row chunks

    def rename(self, fn) -> None:
        """Key tensors by fn(name), dropping those it maps to None (parts the output leaves out)."""
        self.tensors = {new: t for name, t in self.tensors.items() if (new := fn(name)) is not None}
        self.packed = {new: p for name, p in self.packed.items() if (new := fn(name)) is not None}
        self.stored = {new: p for name, p in self.stored.items() if (new := fn(name)) is not None}

    def add_packed(self, name: str, shape: tuple[int, ...], parts: dict[str, TensorInfo], values,
                   dtype: str = "F32", stored: tuple | None = None) -> None:
        """A tensor computed from `parts`: float32 `values(arrays)` (BF16 parts widened first), with the
        dtype it counts as; `stored`: (ggml type, arrays -> its GGUF bytes) where the parts hold it in one."""
        self.tensors[name] = TensorInfo(name, next(iter(parts.values())).file, dtype, shape, 0, 0)
        self.packed[name] = (values, parts)
        if stored is not None:
            self.stored[name] = stored

    def squeeze(self, name: str) -> None:
        """Present a tensor without its axes of size 1 (a convolution's (channels, 1, kernel) weight)."""
        self.reshape(name, tuple(n for n in self.tensors[name].shape if n != 1))

    def reshape(self, name: str, shape: tuple[int, ...]) -> None:
        """Present a tensor with another shape of the same size (Mamba-2's per-head vectors as columns)."""
        info = self.tensors[name]
        self.add_packed(name, shape, {"w": info}, lambda t: t["w"].reshape(shape), info.dtype)

    def stored_type(self, name: str):
        """The ggml block type the checkpoint holds the tensor in, or None."""
        return self.stored[name][0] if name in self.stored else None

    def get_stored(self, name: str) -> np.ndarray:
        """The tensor's GGUF bytes, (rows, bytes per row), as its parts hold them."""
        _, parts = self.packed[name]
        return self.stored[name][1]({k: self._read(i) for k, i in parts.items()})

    def _read(self, info: TensorInfo) -> np.ndarray:
        with open(info.file, "rb") as f:
            f.seek(info.start)
            return np.fromfile(f, dtype=_DTYPES[info.dtype], count=int(np.prod(info.shape))).reshape(info.shape)

    def _dequantized(self, name: str) -> np.ndarray:
        if self._cache[0] != name:
            fn, parts = self.packed[name]
            comps = {k: self._read(i) for k, i in parts.items()}
            comps = {k: bf16_to_f32(v) if parts[k].dtype == "BF16" else v for k, v in comps.items()}
            self._cache = (name, fn(comps))
        return self._cache[1]

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, read with plain file I/O: unlike a memory map, nothing of the
        file stays resident once the chunk is processed."""
        if name in self.packed:
            return self._dequantized(name)[start:stop]
        info = self.tensors[name]
        dtype = np.dtype(_DTYPES[info.dtype])
        row = int(np.prod(info.shape[1:], dtype=np.int64))
        with open(info.file, "rb") as f:
            f.seek(info.start + start * row * dtype.itemsize)
            x = np.fromfile(f, dtype=dtype, count=(stop - start) * row).reshape(stop - start, *info.shape[1:])
        return bf16_to_f32(x) if info.dtype == "BF16" else x.astype(np.float32, copy=False)

    def file(self, name: str) -> Path | None:
        path = self.root / name
        return path if path.is_file() else None


def resolve_source(src: str | os.PathLike) -> Path:
    """A local folder, or a hub repo id resolved through huggingface-hub (honours HF_HUB_OFFLINE)."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise GgufkitError("expected a checkpoint folder (with config.json and *.safetensors)", path)
        return path
    if str(src).count("/") != 1 or str(src).startswith((".", "/")):
        raise GgufkitError("no such folder, and not a hub repo id of the form owner/name", src)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise GgufkitError("not in the local Hugging Face cache and the hub cannot be reached "
                           "(offline, or HF_HUB_OFFLINE=1)", src) from None
    except Exception as exc:  # hub errors come in many classes; the message is what matters
        raise GgufkitError(f"cannot download from the hub: {str(exc).splitlines()[0]}", src) from None


def open_checkpoint(src) -> Checkpoint:
    root = resolve_source(src)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise GgufkitError("missing config.json", config_path)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GgufkitError(f"invalid JSON: {exc}", config_path) from None
    if not isinstance(config, dict):
        raise GgufkitError("invalid config: not a JSON object", config_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, json.JSONDecodeError) as exc:
            raise GgufkitError(f"invalid shard index: {exc}", index) from None
        files = sorted({root / f for f in weight_map.values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise GgufkitError("no *.safetensors weights in the checkpoint folder", root)
    ckpt = Checkpoint(root, config)
    for file in files:
        if not file.is_file():
            raise GgufkitError("shard named in model.safetensors.index.json is missing", file)
        for info in read_safetensors_header(file):
            ckpt.tensors[info.name] = info
    if (fmt := packed_format(config, config_path)) is not None:
        _gather_packed(ckpt, *fmt)
    return ckpt


def _gather_packed(ckpt: Checkpoint, method: str, bits: int) -> None:
    """Replace each packed layer's component tensors by one virtual float32 `<prefix>weight`."""
    suffixes, dequant = FORMATS[method]
    for name in [n for n in ckpt.tensors if n.endswith("." + suffixes[0])]:
        prefix = name[: -len(suffixes[0])]
        parts = {s: ckpt.tensors.pop(prefix + s) for s in suffixes if prefix + s in ckpt.tensors}
        first = parts[suffixes[0]]
        if method == "compressed-tensors":
            shape = tuple(int(v) for v in ckpt._read(parts["weight_shape"]))
        elif method == "gptq":
            shape = (first.shape[1], first.shape[0] * 32 // bits)
        else:
            shape = (first.shape[1] * 32 // bits, first.shape[0])
        ckpt.add_packed(prefix + "weight", shape, parts, lambda t, fn=dequant: fn(t, bits))
