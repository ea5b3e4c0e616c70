"""`ggufkit quantize`: GGUF -> quantized GGUF with llama.cpp's mixtures, tensor by tensor.

Types come from `mixtures.choose_types`, bytes from `ggufkit.kquants`; metadata is copied with
general.file_type / quantization_version and quantize.imatrix.* set as llama-quantize sets them,
and tensors are written in llama-quantize's order, so both tools' files line up. With a budget
(`target`: --target-size / --target-bpw / --match-size) `ggufkit.budget` chooses the types instead,
starting from the mixture's rules; without one the output is llama-quantize's, byte for byte."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ggufkit import budget
from ggufkit.errors import GgufkitError
from ggufkit.gguffile.imatrix import Imatrix, add_provenance, read_imatrix, weights_for
from ggufkit.gguffile.reader import GgufHeader, TensorInfo, read_header, tensor_data
from ggufkit.gguffile.split import SPLIT_KEYS
from ggufkit.gguffile.writer import TensorOut, copy_metadata, data_offset, refuse_overwrite, write_gguf
from ggufkit.gptq import DEFAULT_METHOD, ModelFeedback, check_method, model_feedback
from ggufkit.kquants import dequantize, encode, supported_types
from ggufkit.mixtures import (FLOAT_TYPES, MIXTURES, Options, TensorMeta, choose_types, llama_order, model_info,
                              parse_override, parse_qtype, requires_imatrix)
from ggufkit.progress import bar
from ggufkit.runtime.inspect import type_table

Q = gguf.GGMLQuantizationType
# Rows are read, converted and quantized this many float32 bytes at a time.
CHUNK_BYTES = 64 << 20


@dataclass
class QuantizeResult:
    path: Path
    mixture: str
    types: dict[str, Q]  # every tensor's output type
    bytes_in: int
    without_imatrix: list[str] = field(default_factory=list)  # --allow-missing: quantized without one
    plan: budget.Plan | None = None  # what a budget chose (None: the mixture's rules alone)


def tensor_metas(header: GgufHeader) -> list[TensorMeta]:
    return [TensorMeta(t.name, t.shape, t.type) for t in header.tensors]


def quantize_gguf(src, out, mixture: str, imatrix=None, tensor_types=(), output_tensor_type=None,
                  token_embedding_type=None, pure: bool = False, allow_requantize: bool = False,
                  allow_missing: bool = False, force: bool = False,
                  target: budget.Target | None = None, method: str = DEFAULT_METHOD) -> QuantizeResult:
    """Quantize `src` to `out` as llama-quantize would for `mixture` (Q4_K_M, Q8_0, ...).
    `imatrix`: a path (GGUF or legacy .dat); `tensor_types`: (regex, type) overrides; `target`: a
    byte budget (budget.parse_target) the types are chosen to meet, from the mixture's rules;
    `method`: how the imatrix is used (gptq.METHODS): with "gptq", error feedback where it carries
    input Hessians (`ggufkit imatrix --hessian`); "ggml" or a plain imatrix: llama-quantize's bytes."""
    src, out = Path(src), Path(out)
    mixture = mixture.upper()
    if mixture not in MIXTURES:
        raise GgufkitError(f"unknown quantization type {mixture!r}; choose from {', '.join(MIXTURES)}")
    opts = Options([parse_override(t) for t in tensor_types],
                   None if output_tensor_type is None else parse_qtype(output_tensor_type, "--output-tensor-type"),
                   None if token_embedding_type is None else parse_qtype(token_embedding_type,
                                                                         "--token-embedding-type"),
                   pure)
    refuse_overwrite(out, force)
    check_method(method)
    if out.exists() and out.resolve() == src.resolve():
        raise GgufkitError("input and output are the same file", out)
    if target is not None and pure:
        raise GgufkitError(f"--pure gives every tensor one type; it cannot meet {target}")
    header = read_header(src, arrays=True)
    imat = read_imatrix(imatrix) if imatrix is not None else None
    metas = {t.name: t for t in tensor_metas(header)}
    info = model_info(header.metadata)
    types = choose_types(list(metas.values()), info, mixture, opts, has_imatrix=imat is not None)
    chosen = None
    if target is not None:  # refuse what the mixture would refuse (requantizing) before measuring
        _check_plan(src, mixture, metas, types, [n for n, qt in types.items() if qt != metas[n].qtype],
                    imat is not None, allow_requantize)
        chosen = _budget_plan(header, src, mixture, metas, types, opts, imat, imatrix, allow_missing, target)
        types = chosen.types
    todo = [n for n, qt in types.items() if qt != metas[n].qtype]
    _check_plan(src, mixture, metas, types, todo, imat is not None, allow_requantize)
    weights, without = ({}, []) if imat is None else weights_for(
        imat, {n: metas[n].ne for n in todo if types[n] not in FLOAT_TYPES}, imatrix, allow_missing)
    feedback = model_feedback(imat, method)
    path = _write(header, out, mixture, types, weights, imat, imatrix, feedback)
    return QuantizeResult(path, mixture, types, sum(t.n_bytes for t in header.tensors), without, chosen)


def _budget_plan(header: GgufHeader, src: Path, mixture: str, metas: dict[str, TensorMeta], types: dict[str, Q],
                 opts: Options, imat: Imatrix | None, imatrix_path, allow_missing: bool,
                 target: budget.Target) -> budget.Plan:
    """The types that meet `target` (measuring every candidate type on the input's tensors)."""
    names = budget.budgeted(metas.values(), opts)
    weights = {} if imat is None else weights_for(imat, {n: metas[n].ne for n in names}, imatrix_path,
                                                  allow_missing)[0]
    offset, alignment = data_offset(header.architecture, _tensors_out(header, types, {}),
                                    _metadata(header, mixture, imat, imatrix_path))
    infos = {t.name: t for t in header.tensors}
    with bar(total=len(names), desc="measure types", unit="tensor") as pbar:
        return budget.plan(list(metas.values()), model_info(header.metadata), mixture, target, offset, alignment,
                           lambda n: _float_rows(header, infos[n]), weights, opts, has_imatrix=imat is not None,
                           source=src, progress=lambda i, n: pbar.update(1))


def _check_plan(src: Path, mixture: str, metas: dict[str, TensorMeta], types: dict[str, Q], todo: list[str],
                has_imatrix: bool, allow_requantize: bool) -> None:
    """Refuse before writing anything: missing importance data, requantization, missing quantizers."""
    if not has_imatrix:
        need = [n for n in todo if requires_imatrix(n, types[n], mixture)]
        if need:
            raise GgufkitError(f"{types[need[0]].name} for {need[0]!r} requires an importance matrix "
                               f"(--imatrix); {len(need)} tensors need one", src)
    requant = [n for n in todo if metas[n].qtype not in FLOAT_TYPES]
    if requant and not allow_requantize:
        n = requant[0]
        raise GgufkitError(f"tensor {n!r} is already quantized ({metas[n].qtype.name}); requantizing loses "
                           f"quality, use --allow-requantize to do it anyway ({len(requant)} tensors)", src)
    missing = sorted(t.name for t in {types[n] for n in todo} - set(supported_types()) - set(FLOAT_TYPES))
    if missing:
        raise GgufkitError(f"{mixture} needs {', '.join(missing)}, which ggufkit.kquants cannot produce yet "
                           f"(it has {', '.join(t.name for t in supported_types())})", src)


def _copy_metadata(w: gguf.GGUFWriter, header: GgufHeader, mixture: str, imat: Imatrix | None, imatrix_path):
    """The input's KV pairs, then what llama-quantize changes: file type, quantization version (both
    moved to the end), the imatrix it used; split keys dropped (the output is one file)."""
    copy_metadata(w, header, skip=(*SPLIT_KEYS, gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(int(MIXTURES[mixture][0]))
    if imat is not None:
        add_provenance(w, imat, imatrix_path)


def _float_rows(header: GgufHeader, t: TensorInfo):
    """(expert, float32 rows) slabs of a tensor, read from the memory map a slab at a time."""
    rows_per_expert = t.shape[1] if len(t.shape) > 1 else 1
    data = tensor_data(header, t)
    data = data.reshape(-1, rows_per_expert, data.shape[-1])  # (experts, rows, row bytes)
    step = max(1, CHUNK_BYTES // (4 * t.shape[0]))
    for expert, mat in enumerate(data):
        for start in range(0, rows_per_expert, step):
            rows = np.asarray(mat[start:start + step])
            yield expert, rows.view(np.float32) if t.type == Q.F32 else dequantize(rows, t.type)


def _encoded(header: GgufHeader, t: TensorInfo, new: Q, weights: np.ndarray | None, feedback: ModelFeedback | None):
    cols = t.shape[0]
    fb = None if feedback is None or new in FLOAT_TYPES or len(t.shape) != 2 else feedback.for_weight(t.name, new)
    for expert, rows in _float_rows(header, t):
        if fb is not None:
            yield fb.quantize(rows, new)
            continue
        imat = None if weights is None or new in FLOAT_TYPES else weights[expert * cols:(expert + 1) * cols]
        yield encode(rows, new, imat)


def _tensors_out(header: GgufHeader, types: dict[str, Q], weights: dict[str, np.ndarray],
                 feedback: ModelFeedback | None = None) -> list[TensorOut]:
    """The output's tensors in llama-quantize's order, their data made as the writer asks for it."""
    tensors = []
    for t in llama_order(header.tensors):
        new = types[t.name]
        if new == t.type:  # nothing to do: copied as stored
            data = [np.asarray(tensor_data(header, t)).reshape(-1)]
        else:
            data = _encoded(header, t, new, weights.get(t.name), feedback)
        tensors.append(TensorOut(t.name, tuple(reversed(t.shape)), new, data))
    return tensors


def _metadata(header: GgufHeader, mixture: str, imat: Imatrix | None, imatrix_path):
    return lambda w: _copy_metadata(w, header, mixture, imat, imatrix_path)


def _write(header: GgufHeader, out: Path, mixture: str, types: dict[str, Q], weights: dict[str, np.ndarray],
           imat: Imatrix | None, imatrix_path, feedback: ModelFeedback | None) -> Path:
    return write_gguf(out, header.architecture, _tensors_out(header, types, weights, feedback),
                      _metadata(header, mixture, imat, imatrix_path), desc=f"quantize {mixture}")[0]


def summary(result: QuantizeResult) -> str:
    """The output's type table against the input's size, and what went without importance data."""
    text = type_table(result.path, input_bytes=result.bytes_in)
    if result.plan is not None:
        text = budget.describe(result.plan) + "\n" + text
    if result.without_imatrix:
        text += (f"\nquantized without imatrix data (--allow-missing): {len(result.without_imatrix)} tensors: "
                 + ", ".join(result.without_imatrix[:5]) + (" ..." if len(result.without_imatrix) > 5 else ""))
    return text
