"""`ggufkit convert`: checkpoint -> GGUF in one streaming pass (read, transform, encode, write one
tensor at a time), so peak memory tracks the largest tensor, not the model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ggufkit.convert.checkpoint import Checkpoint, open_checkpoint
from ggufkit.convert.families import Family, family_for
from ggufkit.convert.tokenizer import load_vocab
from ggufkit.convert.writer import atomic_gguf, declare, refuse_overwrite, write_tensor_chunks
from ggufkit.errors import GgufkitError
from ggufkit.convert.prequantized import GRIDS, fit_grid
from ggufkit.kquants import dequantize, encode
from ggufkit.progress import bar

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
OUT_TYPES = {"F32": (Q.F32, F.ALL_F32), "F16": (Q.F16, F.MOSTLY_F16), "BF16": (Q.BF16, F.MOSTLY_BF16),
             "Q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "Q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "Q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
             "Q5_0": (Q.Q5_0, F.MOSTLY_Q5_0), "Q5_1": (Q.Q5_1, F.MOSTLY_Q5_1)}
# --type auto: per tensor, the smallest of these whose grid holds it exactly, else 16-bit floats.
AUTO_ORDER = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclass
class GridReport:
    """What --qat found for one tensor: exact codes written, or quantized normally."""
    name: str
    qtype: str
    exact: bool
    max_error: float  # largest |GGUF value - checkpoint value|


@dataclass
class PlannedTensor:
    gguf_name: str
    hf_name: str | None  # None for tensors computed from the config (rope_freqs)
    shape: tuple[int, ...]  # numpy order (rows..., cols)
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray | None = None  # only for computed tensors


def tensor_type(gguf_name: str, shape: tuple[int, ...], want: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """llama.cpp's rules: vectors and norms stay F32; a row that does not fit the block falls back to F16."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    return want if shape[-1] % block == 0 else Q.F16


def plan(ckpt: Checkpoint, fam: Family, want: gguf.GGMLQuantizationType | None, n_vocab: int) -> list[PlannedTensor]:
    """Match the checkpoint against the config: every tensor present, with the shape it implies.
    `want` None picks each matrix's type from its values (--type auto)."""
    cfg_path = ckpt.root / "config.json"
    expected = fam.expected_tensors()
    unknown = [n for n in ckpt.tensors if n not in expected and not fam.ignored(n)]
    if unknown:
        raise GgufkitError(f"unexpected tensor {unknown[0]!r} for {fam.hf_architecture()} "
                           f"({len(unknown)} unexpected in all)", ckpt.tensors[unknown[0]].file)
    out = []
    for hf_name, shape in expected.items():
        info = ckpt.tensors.get(hf_name)
        if info is None:
            raise GgufkitError(f"tensor {hf_name!r} is missing from the checkpoint", ckpt.root)
        if info.shape != shape:
            raise GgufkitError(f"tensor {hf_name!r} has shape {list(info.shape)}, config implies {list(shape)}",
                               info.file)
        name = fam.gguf_name(hf_name)
        if name is None:
            raise GgufkitError(f"cannot map tensor {hf_name!r} to a GGUF name", cfg_path)
        if name == "token_embd.weight" and shape[0] > n_vocab:  # padding rows past the tokenizer
            shape = (n_vocab, *shape[1:])
        qtype = tensor_type(name, shape, want if want is not None else auto_tensor_type(ckpt, fam, hf_name))
        out.append(PlannedTensor(name, hf_name, shape, qtype))
    for name, data in fam.extra_tensors():
        out.append(PlannedTensor(name, None, data.shape, Q.F32, data))
    return out


# Large tensors are read, transformed and encoded in row chunks of about this many float32 bytes.
CHUNK_BYTES = 64 << 20


def _chunks(ckpt: Checkpoint, fam: Family, t: PlannedTensor, allow_nonfinite: bool):
    """The tensor's transformed float32 rows, a chunk at a time."""
    if t.hf_name is None:
        yield t.data
        return
    rows, row_bytes = t.shape[0], 4 * int(np.prod(t.shape[1:]))
    step = max(1, CHUNK_BYTES // row_bytes) if fam.row_local(t.hf_name) else rows
    for start in range(0, rows, step):
        x = ckpt.get_rows(t.hf_name, start, min(rows, start + step))
        if not allow_nonfinite and not np.isfinite(x).all():
            raise GgufkitError(f"tensor {t.hf_name!r} contains NaN or Inf (use --allow-nonfinite to convert anyway)",
                               ckpt.tensors[t.hf_name].file)
        yield fam.transform(t.hf_name, x)


def write_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, fam: Family, file_type: int) -> None:
    """general.* from the model card and config (gguf's heuristics), then the family's hyper-parameters.
    Call after the tensors are declared: the size label counts their parameters."""
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, ckpt.root, None, total)
    if meta.name is None:
        meta.name = ckpt.root.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    fam.write_hparams(w)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def convert(src, out, out_type: str = "F16", force: bool = False, allow_nonfinite: bool = False,
            split_max_size: int = 0, qat: bool = True, report: list | None = None) -> Path:
    """Convert a checkpoint; with a block type and `qat`, tensors already on its grid keep their exact
    codes (one GridReport per such tensor is appended to `report`)."""
    out = Path(out)
    out_type = out_type.upper()
    if out_type not in OUT_TYPES and out_type != "AUTO":
        raise GgufkitError(f"unknown --type {out_type!r}; choose from {', '.join(OUT_TYPES)}, AUTO")
    refuse_overwrite(out, force)
    report = [] if report is None else report
    ckpt = open_checkpoint(src)
    fam = family_for(ckpt.config, ckpt.root / "config.json")
    want, file_type = OUT_TYPES.get(out_type, (None, None))
    vocab = load_vocab(ckpt.root, fam.config["vocab_size"])
    tensors = plan(ckpt, fam, want, len(vocab.tokens))
    if want is None:  # AUTO: the file type names the most common tensor type
        counts = Counter(t.qtype for t in tensors if t.qtype != Q.F32)
        file_type = next(f for _, (q, f) in OUT_TYPES.items() if q == counts.most_common(1)[0][0])
    total_bytes = 0
    with atomic_gguf(out, fam.arch_name(), split_max_size) as w:
        for t in tensors:
            declare(w, t.gguf_name, t.shape, t.qtype)
        write_metadata(w, ckpt, fam, file_type)
        vocab.add_to_gguf(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with bar(total=len(tensors), desc="convert", unit="tensor") as pbar:
            for t in tensors:
                chunks = lambda t=t: _chunks(ckpt, fam, t, allow_nonfinite)  # noqa: E731
                if qat and t.qtype in GRIDS and t.hf_name is not None:
                    data, row = _grid_or_quantize(chunks, t, ckpt.tensors[t.hf_name].dtype)
                    report.append(row)
                else:
                    data = (encode(x, t.qtype) for x in chunks())
                total_bytes += write_tensor_chunks(w, data)
                pbar.set_postfix_str(f"{total_bytes / 1e6:.0f} MB")
                pbar.update(1)
    return w.produced[0]


def _grid_or_quantize(chunks, t: PlannedTensor, source_dtype: str):
    """Exact grid codes when every block of the tensor fits, else ggml-style quantization; both
    with the tensor's max error against the checkpoint."""
    fitted = []
    for x in chunks():
        fit = fit_grid(x, t.qtype, source_dtype)
        if fit is None:
            break
        fitted.append(fit)
    else:
        err = max((f.max_error for f in fitted), default=0.0)
        return [f.data for f in fitted], GridReport(t.gguf_name, t.qtype.name, True, err)
    fitted.clear()
    errors = []

    def quantized():
        for x in chunks():
            q = encode(x, t.qtype)
            errors.append(float(np.abs(dequantize(q.reshape(x.shape[0], -1), t.qtype) - x.reshape(x.shape[0], -1)).max()))
            yield q
    data = list(quantized())
    return data, GridReport(t.gguf_name, t.qtype.name, False, max(errors, default=0.0))


def auto_tensor_type(ckpt: Checkpoint, fam: Family, hf_name: str) -> gguf.GGMLQuantizationType:
    """The smallest block type whose grid holds a sample of the tensor exactly, else 16-bit floats."""
    info = ckpt.tensors[hf_name]
    # A few rows suffice, except where the transform mixes rows (q/k heads): those are small, read whole.
    rows = min(64, info.shape[0]) if fam.row_local(hf_name) else info.shape[0]
    x = fam.transform(hf_name, ckpt.get_rows(hf_name, 0, rows))
    for name in AUTO_ORDER:
        if fit_grid(x, OUT_TYPES[name][0], info.dtype) is not None:
            return OUT_TYPES[name][0]
    return Q.BF16 if info.dtype == "BF16" else Q.F16


def convert(src, out, out_type: str = "F16", force: bool = False, allow_nonfinite: bool = False,
            split_max_size: int = 0, qat: bool = True, report: list | None = None) -> Path:
    """Convert a checkpoint; with a block type and `qat`, tensors already on its grid keep their exact
    codes (one GridReport per such tensor is appended to `report`)."""
    out = Path(out)
    out_type = out_type.upper()
    if out_type not in OUT_TYPES and out_type != "AUTO":
        raise GgufkitError(f"unknown --type {out_type!r}; choose from {', '.join(OUT_TYPES)}, AUTO")
    refuse_overwrite(out, force)
    report = [] if report is None else report
    ckpt = open_checkpoint(src)
    fam = family_for(ckpt.config, ckpt.root / "config.json")
    want, file_type = OUT_TYPES.get(out_type, (None, None))
    vocab = load_vocab(ckpt.root, fam.config["vocab_size"])
    tensors = plan(ckpt, fam, want, len(vocab.tokens))
    if want is None:  # AUTO: the file type names the most common tensor type
        counts = Counter(t.qtype for t in tensors if t.qtype != Q.F32)
        file_type = next(f for _, (q, f) in OUT_TYPES.items() if q == counts.most_common(1)[0][0])
    total_bytes = 0
    with atomic_gguf(out, fam.arch_name(), split_max_size) as w:
        for t in tensors:
            declare(w, t.gguf_name, t.shape, t.qtype)
        write_metadata(w, ckpt, fam, file_type)
        vocab.add_to_gguf(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with bar(total=len(tensors), desc="convert", unit="tensor") as pbar:
            for t in tensors:
                chunks = lambda t=t: _chunks(ckpt, fam, t, allow_nonfinite)  # noqa: E731
                if qat and t.qtype in GRIDS and t.hf_name is not None:
                    data, row = _grid_or_quantize(chunks, t, ckpt.tensors[t.hf_name].dtype)
                    report.append(row)
                else:
                    data = (encode(x, t.qtype) for x in chunks())
                total_bytes += write_tensor_chunks(w, data)
                pbar.set_postfix_str(f"{total_bytes / 1e6:.0f} MB")
                pbar.update(1)
    return w.produced[0]


def _grid_or_quantize(chunks, t: PlannedTensor, source_dtype: str):
    """Exact grid codes when every block of the tensor fits, else ggml-style quantization; both
    with the tensor's max error against the checkpoint."""
    fitted = []
    for x in chunks():
        fit = fit_grid(x, t.qtype, source_dtype)
        if fit is None:
            break
        fitted.append(fit)
    else:
        err = max((f.max_error for f in fitted), default=0.0)
        return [f.data for f in fitted], GridReport(t.gguf_name, t.qtype.name, True, err)
    fitted.clear()
    errors = []

    def quantized():
        for x in chunks():
            q = encode(x, t.qtype)
            errors.append(float(np.abs(dequantize(q.reshape(x.shape[0], -1), t.qtype) - x.reshape(x.shape[0], -1)).max()))
            yield q
    data = list(quantized())
    return data, GridReport(t.gguf_name, t.qtype.name, False, max(errors, default=0.0))


def auto_type(ckpt: Checkpoint, fam: Family) -> str:
    """The smallest block type whose grid holds a sample of the largest matrices exactly."""
    mats = sorted((n for n, i in ckpt.tensors.items() if len(i.shape) == 2 and not fam.ignored(n)),
                  key=lambda n: -int(np.prod(ckpt.tensors[n].shape)))[:3]
    samples = [(fam.transform(n, ckpt.get_rows(n, 0, min(64, ckpt.tensors[n].shape[0]))) if fam.row_local(n)
                else None, ckpt.tensors[n].dtype) for n in mats]
    samples = [(x, dt) for x, dt in samples if x is not None]
    for name in AUTO_ORDER:
        if samples and all(fit_grid(x, OUT_TYPES[name][0], dt) is not None for x, dt in samples):
            return name
    return "BF16" if any(i.dtype == "BF16" for i in ckpt.tensors.values()) else "F16"
