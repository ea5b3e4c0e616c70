"""`ggufkit convert`: checkpoint -> GGUF in one streaming pass (read, transform, encode, write one
tensor at a time), so peak memory tracks the largest tensor, not the model."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ggufkit import budget
from ggufkit.convert.checkpoint import Checkpoint, open_checkpoint
from ggufkit.convert.families import Family, family_for
from ggufkit.convert.prequantized import GRIDS, fit_grid
from ggufkit.errors import GgufkitError
from ggufkit.gguffile.imatrix import add_provenance, read_imatrix, weights_for
from ggufkit.gguffile.writer import TensorOut, data_offset, refuse_overwrite, write_gguf, written_metadata
from ggufkit.gptq import DEFAULT_METHOD, ModelFeedback, check_method, model_feedback
from ggufkit.kquants import dequantize, encode
from ggufkit.mixtures import FLOAT_TYPES, MIXTURES, TensorMeta, choose_types, fallback, model_info, requires_imatrix
from ggufkit.progress import bar

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# --type values of two kinds. convert_hf_to_gguf's output types: every matrix gets the type (rows that
# do not fit its block fall back to F16), as llama.cpp's converter writes them.
CONVERTER_TYPES = {"F32": (Q.F32, F.ALL_F32), "F16": (Q.F16, F.MOSTLY_F16), "BF16": (Q.BF16, F.MOSTLY_BF16),
                   "Q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}
# llama-quantize's mixtures (Q4_K_M, Q4_1, ...): per-tensor types by its rules, as if quantizing our F32 file.
MIXTURE_TYPES = tuple(m for m in MIXTURES if m not in CONVERTER_TYPES)
OUT_TYPES = (*CONVERTER_TYPES, *MIXTURE_TYPES, "AUTO")
# --type auto: per tensor, the smallest of these whose grid holds it exactly, else 16-bit floats.
AUTO_ORDER = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
AUTO_FILE_TYPES = {Q.Q4_0: F.MOSTLY_Q4_0, Q.Q4_1: F.MOSTLY_Q4_1, Q.Q5_0: F.MOSTLY_Q5_0, Q.Q5_1: F.MOSTLY_Q5_1,
                   Q.Q8_0: F.MOSTLY_Q8_0, Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16}


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
    hf_name: str | None  # its (first) checkpoint tensor; None for tensors computed from the config (rope_freqs)
    shape: tuple[int, ...]  # numpy order (rows..., cols); experts x rows x cols for merged experts
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray | None = None  # only for computed tensors
    sources: tuple[str, ...] = ()  # the checkpoint tensors stacked into it (one, or one per expert)


# matrices llama.cpp's converter keeps in F32: expert routers, convolutions
CONVERTER_F32 = ("ffn_gate_inp", "shortconv.conv", "ssm_conv1d")


def tensor_type(gguf_name: str, shape: tuple[int, ...], want: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """llama.cpp's converter's rules: vectors, norms, expert routers and convolutions stay F32; a row that
    does not fit the block falls back as llama-quantize's rows do (for the converter's 32-block types: to F16)."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight") \
            or any(part in gguf_name for part in CONVERTER_F32):
        return Q.F32
    return fallback(want, shape[-1])


def plan(ckpt: Checkpoint, fam: Family, out_type: str, n_vocab: int, has_imatrix: bool = False,
         qat: bool = False) -> list[PlannedTensor]:
    """Match the checkpoint against the config (every tensor present, with the shape it implies)
    and give each tensor its type for `out_type` (one of OUT_TYPES). With `qat`, a mixture keeps a
    tensor whose values sit on its base type's grid (Q4_0 for Q4_0) in that type, where the rules
    would pick another type that cannot hold it exactly (a Q4_0-trained token_embd stays Q4_0, not Q6_K)."""
    cfg_path = ckpt.root / "config.json"
    expected = fam.expected_tensors()
    if "lm_head.weight" in ckpt.tensors and "lm_head.weight" not in expected:
        # tied, yet stored (some exports keep it): llama.cpp's converter writes it as output.weight,
        # which llama.cpp then uses instead of the embedding
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    unknown = [n for n in ckpt.tensors if n not in expected and not fam.ignored(n)]
    if unknown:
        raise GgufkitError(f"unexpected tensor {unknown[0]!r} for {fam.hf_architecture()} "
                           f"({len(unknown)} unexpected in all)", ckpt.tensors[unknown[0]].file)
    for hf_name, shape in expected.items():
        info = ckpt.tensors.get(hf_name)
        if info is None:
            raise GgufkitError(f"tensor {hf_name!r} is missing from the checkpoint", ckpt.root)
        if info.shape != shape:
            raise GgufkitError(f"tensor {hf_name!r} has shape {list(info.shape)}, config implies {list(shape)}",
                               info.file)
    out = []
    for name, sources in fam.layout(expected):
        hf_name = sources[0]
        if name is None:
            raise GgufkitError(f"cannot map tensor {hf_name!r} to a GGUF name", cfg_path)
        shape = expected[hf_name] if len(sources) == 1 else (len(sources), *expected[hf_name])
        if name == "token_embd.weight" and shape[0] > n_vocab:  # padding rows past the tokenizer
            shape = (n_vocab, *shape[1:])
        if (stored := ckpt.stored_type(hf_name)) is not None and out_type not in MIXTURE_TYPES:
            qtype = stored  # llama.cpp's converter writes MXFP4 experts as they are, whatever --outtype
        elif out_type == "AUTO":
            qtype = tensor_type(name, shape, auto_tensor_type(ckpt, fam, hf_name))
        else:
            qtype = tensor_type(name, shape, CONVERTER_TYPES.get(out_type, (Q.F32,))[0])
        out.append(PlannedTensor(name, hf_name, shape, qtype, sources=sources))
    for name, data in fam.extra_tensors():
        out.append(PlannedTensor(name, None, data.shape, Q.F32, data))
    if out_type in MIXTURE_TYPES:
        _mixture_types(out, ckpt, fam, out_type, has_imatrix, qat)
    return out


def _mixture_types(tensors: list[PlannedTensor], ckpt: Checkpoint, fam: Family, mixture: str, has_imatrix: bool,
                   qat: bool) -> None:
    """Set each tensor's type by llama-quantize's rules for `mixture`, as if quantizing our F32 file."""
    metas = [TensorMeta(t.gguf_name, tuple(reversed(t.shape)), t.qtype) for t in tensors]
    info = model_info(written_metadata(fam.arch_name(), fam.write_hparams))
    types = choose_types(metas, info, mixture, has_imatrix=has_imatrix)
    base = MIXTURES[mixture][1]
    for t in tensors:
        t.qtype = types[t.gguf_name]
        if qat and t.qtype not in FLOAT_TYPES and t.qtype != base and t.hf_name is not None \
                and _only_base_grid_holds(ckpt, fam, t, base):
            t.qtype = base
        if requires_imatrix(t.gguf_name, t.qtype, mixture) and not has_imatrix:
            raise GgufkitError(f"{mixture} needs an importance matrix for {t.gguf_name} "
                               "(give --imatrix or --calibration)", ckpt.root / "config.json")


def _only_base_grid_holds(ckpt: Checkpoint, fam: Family, t: PlannedTensor, base) -> bool:
    """Whether a sample of the tensor sits on the base type's grid but not on its planned type's."""
    if base not in GRIDS:
        return False
    x, dtype = _sample(ckpt, fam, t.hf_name)
    return (t.qtype not in GRIDS or fit_grid(x, t.qtype, dtype) is None) and fit_grid(x, base, dtype) is not None


# Large tensors are read, transformed and encoded in row chunks of about this many float32 bytes.
CHUNK_BYTES = 64 << 20


def _chunks(ckpt: Checkpoint, fam: Family, t: PlannedTensor, allow_nonfinite: bool):
    """The tensor's transformed float32 rows, a chunk at a time, each with the index of the expert
    it belongs to (0 but in merged experts, which are read one expert at a time, in order)."""
    if t.hf_name is None:
        yield 0, t.data
        return
    for expert, hf_name in enumerate(t.sources):
        shape = t.shape[1:] if len(t.sources) > 1 else t.shape
        rows, row_bytes = shape[0], 4 * int(np.prod(shape[1:]))
        step = max(1, CHUNK_BYTES // row_bytes) if fam.row_local(hf_name) else rows
        for start in range(0, rows, step):
            x = ckpt.get_rows(hf_name, start, min(rows, start + step))
            if not allow_nonfinite and not np.isfinite(x).all():
                raise GgufkitError(f"tensor {hf_name!r} contains NaN or Inf (use --allow-nonfinite to convert anyway)",
                                   ckpt.tensors[hf_name].file)
            yield expert, fam.transform(hf_name, x)


def _expert_weights(imatrix: np.ndarray | None, expert: int, cols: int) -> np.ndarray | None:
    """One expert's importance weights (an imatrix holds experts x cols values for a 3-D tensor)."""
    if imatrix is None or imatrix.size == cols:  # none, or a 2-D tensor's
        return imatrix
    return imatrix[expert * cols:(expert + 1) * cols]


def write_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, fam: Family, file_type: int) -> None:
    """general.* from the model card and config (gguf's heuristics), then the family's hyper-parameters.
    Call after the tensors are declared: the size label counts their parameters."""
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, ckpt.root, None, total)
    if meta.sampling_penalty_repeat is None:
        # llama.cpp's converter (a newer gguf-py than PyPI's) also reads transformers' own name for it
        meta.sampling_penalty_repeat = gguf.Metadata.load_generation_config(ckpt.root).get("repetition_penalty")
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
            split_max_size: int = 0, qat: bool = True, report: list | None = None, imatrix=None,
            allow_missing: bool = False, target: budget.Target | None = None, plans: list | None = None,
            method: str = DEFAULT_METHOD, types: dict | None = None) -> Path:
    """Convert a checkpoint to `out_type` (see OUT_TYPES). With a block type and `qat`, tensors already
    on its grid keep their exact codes (one GridReport per such tensor is appended to `report`).
    `imatrix`: a path, or an `Imatrix` (then recorded as measured by convert --calibration).
    `target`: a byte budget for a mixture (budget.parse_target): the types are chosen to meet it,
    starting from the mixture's rules; its `budget.Plan` is appended to `plans`. `method`: how the
    imatrix is used (gptq.METHODS): with "gptq", error feedback where it carries input Hessians.
    `types`: {GGUF name: type} replacing the mixture's choice for those tensors (the types of a file
    chosen before, such as the one training started from)."""
    out = Path(out)
    out_type = out_type.upper()
    if out_type not in OUT_TYPES:
        raise GgufkitError(f"unknown --type {out_type!r}; choose from {', '.join(OUT_TYPES)}")
    if imatrix is not None and out_type not in MIXTURE_TYPES:
        raise GgufkitError(f"an importance matrix applies to llama.cpp's mixtures ({', '.join(MIXTURE_TYPES)}), "
                           f"not to --type {out_type}")
    if target is not None and out_type not in MIXTURE_TYPES:
        raise GgufkitError(f"{target} applies to llama.cpp's mixtures ({', '.join(MIXTURE_TYPES)}), "
                           f"not to --type {out_type}")
    if target is not None and split_max_size:
        raise GgufkitError(f"{target} sizes one file; it cannot be combined with --split-max-size")
    refuse_overwrite(out, force)
    check_method(method)
    report = [] if report is None else report
    imat = read_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    ckpt = open_checkpoint(src)
    fam = family_for(ckpt.config, ckpt.root / "config.json")
    fam.prepare(ckpt)
    vocab = fam.load_vocab(ckpt.root)
    tensors = plan(ckpt, fam, out_type, len(vocab.tokens), has_imatrix=imat is not None, qat=qat)
    if types:
        if out_type not in MIXTURE_TYPES or target is not None:
            raise GgufkitError("per-tensor types replace a mixture's rules, without a byte budget")
        for t in tensors:
            t.qtype = types.get(t.gguf_name, t.qtype)

    def metadata(w: gguf.GGUFWriter) -> None:
        write_metadata(w, ckpt, fam, _file_type(out_type, tensors))
        if imat is not None:
            add_provenance(w, imat, imatrix if isinstance(imatrix, (str, Path)) else CALIBRATED)
        vocab.add_to_gguf(w)

    if target is not None:
        chosen = _budget_types(ckpt, fam, tensors, out_type, target, imat, imatrix, metadata, allow_nonfinite,
                               allow_missing, src)
        if plans is not None:
            plans.append(chosen)
    weights = {}
    if imat is not None:
        quantized = {t.gguf_name: tuple(reversed(t.shape)) for t in tensors if t.qtype not in FLOAT_TYPES}
        weights, without = weights_for(imat, quantized, imatrix if isinstance(imatrix, (str, Path)) else src,
                                       allow_missing)
        if without:
            print(f"ggufkit: {len(without)} tensors quantized without importance data (--allow-missing): "
                  f"{', '.join(without[:5])}{' ...' if len(without) > 5 else ''}", file=sys.stderr)

    feedback = model_feedback(imat, method)
    data = [TensorOut(t.gguf_name, t.shape, t.qtype,
                      _encoded(ckpt, fam, t, allow_nonfinite, _encoder(t, weights.get(t.gguf_name), feedback),
                               qat, report))
            for t in tensors]
    return write_gguf(out, fam.arch_name(), data, metadata, split_max_size, desc="convert")[0]


def _budget_types(ckpt: Checkpoint, fam: Family, tensors: list[PlannedTensor], mixture: str, target: budget.Target,
                  imat, imatrix, metadata, allow_nonfinite: bool, allow_missing: bool, src) -> budget.Plan:
    """Set each tensor's type to what meets `target` (every candidate type measured on the
    checkpoint's tensors, with the importance matrix where there is one)."""
    metas = [TensorMeta(t.gguf_name, tuple(reversed(t.shape)), t.qtype if t.qtype in FLOAT_TYPES else Q.F32)
             for t in tensors]
    names = budget.budgeted(metas)
    by_name = {t.gguf_name: t for t in tensors}
    weights = {}
    if imat is not None:
        weights = weights_for(imat, {n: tuple(reversed(by_name[n].shape)) for n in names},
                              imatrix if isinstance(imatrix, (str, Path)) else src, allow_missing)[0]
    offset, alignment = data_offset(fam.arch_name(), [TensorOut(t.gguf_name, t.shape, t.qtype, ()) for t in tensors],
                                    metadata)
    info = model_info(written_metadata(fam.arch_name(), fam.write_hparams))
    with bar(total=len(names), desc="measure types", unit="tensor") as pbar:
        chosen = budget.plan(metas, info, mixture, target, offset, alignment,
                             lambda n: _chunks(ckpt, fam, by_name[n], allow_nonfinite), weights,
                             has_imatrix=imat is not None, source=src, progress=lambda i, n: pbar.update(1))
    for t in tensors:
        t.qtype = chosen.types[t.gguf_name]
    return chosen


# quantize.imatrix.file of a model whose imatrix convert measured itself
CALIBRATED = "ggufkit convert --calibration"


def _file_type(out_type: str, tensors: list[PlannedTensor]) -> int:
    if out_type in MIXTURE_TYPES:
        return MIXTURES[out_type][0]
    if out_type != "Q8_0" and any(t.qtype == Q.MXFP4 for t in tensors):  # a checkpoint's MXFP4 experts, as
        return F.MOSTLY_MXFP4_MOE  # llama.cpp's converter names the file for its float types
    if out_type in CONVERTER_TYPES:
        return CONVERTER_TYPES[out_type][1]
    # AUTO: the file type names the most common matrix type
    counts = Counter(t.qtype for t in tensors if t.qtype != Q.F32)
    return AUTO_FILE_TYPES[counts.most_common(1)[0][0]]


Encoder = Callable[[int, np.ndarray], np.ndarray]  # (expert, rows) -> the rows' GGUF bytes


def _encoder(t: PlannedTensor, imatrix: np.ndarray | None, feedback: ModelFeedback | None) -> Encoder:
    """How the tensor's rows become bytes: with error feedback where its input's H is known (and the
    type is a block type), else ggml's rounding with the importance weights. The feedback's factors
    are made when the rows come (kept for the few latest inputs), not for every tensor up front."""
    def encoded(expert: int, x: np.ndarray) -> np.ndarray:
        fb = None if feedback is None or t.qtype in FLOAT_TYPES or len(t.shape) != 2 else \
            feedback.for_weight(t.gguf_name, t.qtype)
        if fb is not None:
            return fb.quantize(x.reshape(-1, x.shape[-1]), t.qtype).reshape(*x.shape[:-1], -1)
        return encode(x, t.qtype, _expert_weights(imatrix, expert, t.shape[-1]))
    return encoded


def _encoded(ckpt: Checkpoint, fam: Family, t: PlannedTensor, allow_nonfinite: bool, encoder: Encoder,
             qat: bool, report: list):
    """The tensor's bytes, a chunk at a time: exact grid codes with `qat` where they fit (reported),
    else quantized."""
    chunks = lambda: _chunks(ckpt, fam, t, allow_nonfinite)  # noqa: E731
    if t.hf_name is not None and ckpt.stored_type(t.hf_name) == t.qtype:  # the checkpoint's own bytes
        yield from (ckpt.get_stored(source) for source in t.sources)
    elif qat and t.qtype in GRIDS and t.hf_name is not None:
        yield from _grid_or_quantize(chunks, t, ckpt.tensors[t.hf_name].dtype, encoder, report)
    else:
        for expert, x in chunks():
            yield encoder(expert, x)


def _grid_or_quantize(chunks, t: PlannedTensor, source_dtype: str, encoder: Encoder, report: list):
    """Exact grid codes when every block of the tensor fits, else ggml-style quantization, a chunk at
    a time; then the tensor's report row (which, and the max error against the checkpoint)."""
    fitted = []
    for _, x in chunks():
        fit = fit_grid(x, t.qtype, source_dtype)
        if fit is None:
            break
        fitted.append(fit)
    else:
        yield from (f.data for f in fitted)
        report.append(GridReport(t.gguf_name, t.qtype.name, True, max((f.max_error for f in fitted), default=0.0)))
        return
    fitted.clear()
    error = 0.0
    for expert, x in chunks():  # streamed: a checkpoint off the grid is the common case
        q = encoder(expert, x)
        error = max(error, float(np.abs(dequantize(q.reshape(x.shape[0], -1), t.qtype) - x.reshape(x.shape[0], -1)).max()))
        yield q
    report.append(GridReport(t.gguf_name, t.qtype.name, False, error))


def _sample(ckpt: Checkpoint, fam: Family, hf_name: str) -> tuple[np.ndarray, str]:
    """The first rows of a tensor as GGUF stores them, and the checkpoint's dtype: enough to tell a
    tensor on a grid from one that is not. Where the transform mixes rows (q/k heads) the tensor is
    small: read whole."""
    info = ckpt.tensors[hf_name]
    rows = min(64, info.shape[0]) if fam.row_local(hf_name) else info.shape[0]
    return fam.transform(hf_name, ckpt.get_rows(hf_name, 0, rows)), info.dtype


def auto_tensor_type(ckpt: Checkpoint, fam: Family, hf_name: str) -> gguf.GGMLQuantizationType:
    """The smallest block type whose grid holds a sample of the tensor exactly, else 16-bit floats."""
    x, dtype = _sample(ckpt, fam, hf_name)
    for qtype in AUTO_ORDER:
        if fit_grid(x, qtype, dtype) is not None:
            return qtype
    return Q.BF16 if dtype == "BF16" else Q.F16


