"""`ggufkit qat`: checkpoint -> GGUF trained onto its grids. In a temp folder beside the output: the
lossless GGUF and its importance matrix (with input Hessians) on the training text; the best
post-training file (error feedback), whose weights training starts from; distillation (qat.train);
the trained weights as a float32 checkpoint, written by `convert --method ggml`, which rounds them
exactly as training's fake quantizer did; and a check of that, tensor by tensor, before the file
takes its name."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ggufkit.commands.convert import DEFAULT_CALIBRATION_CHUNKS, lossless_type
from ggufkit.convert.checkpoint import open_checkpoint
from ggufkit.convert.families import family_for
from ggufkit.convert.pipeline import MIXTURE_TYPES, PlannedTensor, convert, plan
from ggufkit.convert.safetensors_out import write_safetensors
from ggufkit.errors import GgufkitError
from ggufkit.gguffile.imatrix import read_imatrix, weights_for
from ggufkit.gguffile.reader import read_header, tensor_data
from ggufkit.gguffile.writer import refuse_overwrite
from ggufkit.kquants import dequantize
from ggufkit.mixtures import FLOAT_TYPES
from ggufkit.runtime.imatrix import collect

# Where training starts: error feedback's file, or the checkpoint itself (ggml's rounding of it);
# a path instead names a GGUF of the same model (any types) whose weights to start from.
INITS = ("gptq", "ggml")


@dataclass
class QatReport:
    output: str
    type: str
    init: str
    steps: int
    best_step: int
    heldout_kl: list  # (step, mean KL divergence on the held-out windows), step 0 = the starting file
    tokens_per_s: float
    train_seconds: float


def qat_command(src, out, out_type: str, texts, settings=None, init: str = "gptq", imatrix=None, target=None,
                ctx: int = 512, chunks: int | None = DEFAULT_CALIBRATION_CHUNKS, threads: int | None = None,
                force: bool = False, resume=None, state_dir=None) -> QatReport:
    """Train `src` onto the grids of the mixture `out_type` on `texts` and write the GGUF `out`.
    `settings`: qat.train.Settings; `init`: INITS or a GGUF path, whose per-tensor types are kept
    (so training starts from, and improves on, exactly that file); `imatrix`: an importance matrix
    file (with Hessians for gptq) instead of measuring one on `texts`; `target`: a byte budget
    (budget.Target) for the gptq start. Ctrl-C saves the training state in `state_dir` (default:
    beside the output) for `resume`."""
    try:
        from ggufkit.qat.fakequant import quantizers
        from ggufkit.qat.train import Settings, check_device, train, training_windows
    except ImportError as exc:
        raise GgufkitError(f"ggufkit qat needs torch and transformers ({exc.name} is missing): "
                           "pip install 'ggufkit[qat]'") from exc
    settings = settings or Settings()
    out, out_type = Path(out), out_type.upper()
    if out_type not in MIXTURE_TYPES:
        raise GgufkitError(f"qat trains onto a mixture's grids ({', '.join(MIXTURE_TYPES)}), not --type {out_type}")
    if init not in INITS and not Path(init).is_file():
        raise GgufkitError(f"--init {init!r} is neither {' nor '.join(INITS)} nor a GGUF file")
    if target is not None and init != "gptq":
        raise GgufkitError(f"{target} chooses the types of the gptq start (--init gptq); a start file has its own")
    texts = [Path(t) for t in texts]
    for t in texts:
        if not t.is_file():
            raise GgufkitError("no such training text", t)
    refuse_overwrite(out, force)
    check_device(settings.device)
    src = open_checkpoint(src).root
    windows = training_windows(src, texts, settings)  # a text too short fails now, before the imatrix
    state_dir = Path(state_dir) if state_dir else out.with_name(out.name + ".qat-state")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ggufkit-qat-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if imatrix is None:
            base = convert(src, tmp / "base.gguf", out_type=lossless_type(src))
            imatrix = collect(base, texts, ctx=ctx, chunks=chunks, threads=threads, hessians=init == "gptq")
            imatrix.datasets = [t.name for t in texts]
        else:
            imatrix = read_imatrix(imatrix)
        ckpt = open_checkpoint(src)
        fam = family_for(ckpt.config, ckpt.root / "config.json")
        fam.prepare(ckpt)
        tensors = plan(ckpt, fam, out_type, len(fam.load_vocab(ckpt.root).tokens), has_imatrix=True)
        full = lambda hf_name: ckpt.get_rows(hf_name, 0, ckpt.tensors[hf_name].shape[0])  # noqa: E731
        start, types = None, None
        if init != "ggml":
            start_file = Path(init) if init != "gptq" else convert(src, tmp / "ptq.gguf", out_type=out_type,
                                                                   imatrix=imatrix, method="gptq", target=target)
            start, types = _file_weights(start_file, fam, tensors, full)
            for t in tensors:
                t.qtype = types.get(t.gguf_name, t.qtype)
        quantized = {t.gguf_name: tuple(reversed(t.shape)) for t in tensors if t.qtype not in FLOAT_TYPES}
        fq = quantizers(fam, tensors, weights_for(imatrix, quantized, src)[0], full, src)
        result = train(src, fq, windows, settings, init=start, state_dir=state_dir, resume=resume)
        trained = _write_checkpoint(src, tmp / src.name, ckpt, result.weights)
        written = convert(trained, tmp / "out.gguf", out_type=out_type, imatrix=imatrix, method="ggml", qat=False,
                          types=types)
        _check_written(written, fam, tensors, {n: q.round(result.weights[n])[0] for n, q in fq.items()})
        os.replace(written, out)
    if state_dir.exists():
        shutil.rmtree(state_dir)  # a finished run's Ctrl-C state is stale
    return QatReport(str(out), out_type, init, settings.steps, result.best_step, result.heldout_kl,
                     round(result.tokens_per_s, 1), round(result.seconds, 1))


def _dequantized(header, tensors: list[PlannedTensor]):
    """(planned tensor, its values in the GGUF `header`) for every tensor made from the checkpoint."""
    by_name = {t.name: t for t in header.tensors}
    for t in tensors:
        if t.hf_name is None:
            continue
        info = by_name.get(t.gguf_name)
        if info is None or tuple(reversed(info.shape)) != t.shape:
            raise GgufkitError(f"not a GGUF of this model: {t.gguf_name} is "
                               f"{'missing' if info is None else f'of shape {list(reversed(info.shape))}'}",
                               header.path)
        yield t, dequantize(tensor_data(header, info), info.type).reshape(t.shape)


def _file_weights(path: Path, fam, tensors: list[PlannedTensor], full) -> tuple[dict[str, np.ndarray], dict]:
    """A GGUF's dequantized weights in the checkpoint's names and layout (padding rows past the
    tokenizer, which the GGUF drops, keep the checkpoint's values), and its types by GGUF name."""
    header = read_header(path)
    out = {}
    for t, x in _dequantized(header, tensors):
        for expert, hf_name in enumerate(t.sources):
            part = x[expert] if len(t.sources) > 1 else x
            w = full(hf_name)
            w[:part.shape[0]] = fam.untransform(t.gguf_name, part)
            out[hf_name] = w
    return out, {t.name: t.type for t in header.tensors}


def _write_checkpoint(src: Path, folder: Path, ckpt, trained: dict[str, np.ndarray]) -> Path:
    """`src` with the trained weights, in float32: its config, tokenizer and card files copied."""
    folder.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")):
            shutil.copy2(f, folder / f.name)

    def values(name: str) -> np.ndarray:
        w = trained[name] if name in trained else ckpt.get_rows(name, 0, ckpt.tensors[name].shape[0])
        return np.ascontiguousarray(w, dtype=np.float32)
    write_safetensors(folder, [(n, t.shape) for n, t in ckpt.tensors.items()], values, "float32")
    return folder


def _check_written(path: Path, fam, tensors: list[PlannedTensor], expected: dict[str, np.ndarray]) -> None:
    """Every trained tensor of the written file dequantizes to the fake-quantized weights, bit for bit."""
    for t, x in _dequantized(read_header(path), tensors):
        parts = [fam.transform(n, expected[n][:t.shape[-2] if len(t.shape) > 1 else t.shape[0]]) for n in t.sources]
        want = np.stack(parts) if len(t.sources) > 1 else parts[0]
        if not np.array_equal(np.ascontiguousarray(x).view(np.uint32), np.ascontiguousarray(want, np.float32).view(np.uint32)):
            raise GgufkitError(f"{t.gguf_name} as written differs from the trained fake-quantized weights", path)


def report_dict(report: QatReport) -> dict:
    return asdict(report)
