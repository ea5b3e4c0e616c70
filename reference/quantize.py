"""llama-quantize and llama-imatrix as references for `ggufkit quantize` / `ggufkit imatrix`, small
synthetic GGUFs that reach the mixture rules the real test models cannot (256-multiple rows, GQA 4,
8 experts, separate output), and comparisons of GGUF files and tensors."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np

from ggufkit.commands.quantize import tensor_metas
from ggufkit.gguffile.imatrix import Entry, Imatrix, write_imatrix
from ggufkit.gguffile.reader import read_header, tensor_data
from ggufkit.gguffile.writer import TensorOut, copy_metadata, write_gguf
from ggufkit.mixtures import MIXTURES, choose_types, model_info
from reference.llama_cpp import llama_tool

Q = gguf.GGMLQuantizationType
# "[  7/272] blk.0.attn_v.weight - [576, 192, 1, 1], type = f32, size = 0.42 MiB -> 0.11 MiB (q8_0)"
DRY_RUN_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s+(\S+), size = [^(]*(?:\((\S+)\))?\s*$")


def llama_quantize(src: Path, out: Path | None, mixture: str, *flags: str) -> subprocess.CompletedProcess:
    """Run llama-quantize (out None: --dry-run) with 2 threads; raises with its log on failure."""
    cmd = [str(llama_tool("llama-quantize")), *flags]
    cmd += ["--dry-run", str(src), mixture] if out is None else [str(src), str(out), mixture, "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-quantize failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def reference_types(src: Path, mixture: str, *flags: str) -> dict[str, Q]:
    """The type llama-quantize picks for every tensor, from its --dry-run log."""
    proc = llama_quantize(src, None, mixture, *flags)
    types = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = DRY_RUN_LINE.match(line)
        if m:
            types[m.group(1)] = Q[(m.group(3) or m.group(2)).upper()]
    return types


@functools.lru_cache(maxsize=8)
def _tensor_table(src: Path):
    header = read_header(src, arrays=True)
    return tensor_metas(header), model_info(header.metadata)


def ggufkit_types(src: Path, mixture: str, has_imatrix: bool = False, opts=None) -> dict[str, Q]:
    metas, info = _tensor_table(Path(src))
    return choose_types(metas, info, mixture, opts, has_imatrix=has_imatrix)


def llama_imatrix(model: Path, text: Path, out: Path, ctx: int, chunks: int, *flags: str) -> Path:
    cmd = [str(llama_tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
           "--chunks", str(chunks), "--no-ppl", "-t", "2", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-imatrix failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return out


def fake_imatrix(model: Path, out: Path, seed: int = 0) -> Path:
    """A plausible imatrix for every layer matrix of `model` (random positive sums): enough for
    comparing two quantizers that are given the same one."""
    rng = np.random.default_rng(seed)
    entries = {}
    for t in read_header(model).tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2 and not t.name.endswith("_norm.weight"):
            n_mat = t.shape[2] if len(t.shape) > 2 else 1
            sums = rng.gamma(1.0, 1.0, size=(n_mat, t.shape[0])).astype(np.float32) * 512
            entries[t.name] = Entry(sums, np.full(n_mat, 512, dtype=np.float32))
    return write_imatrix(Imatrix(entries, ["synthetic"], 1, 512), out)


def synthetic_gguf(path: Path, arch: str = "llama", n_layer: int = 8, n_embd: int = 256, n_head: int = 8,
                   n_head_kv: int = 2, n_ff: int = 512, n_expert: int = 0, n_vocab: int = 512,
                   tied: bool = False, vocab: Path | None = None, norm: float = 0.0) -> Path:
    """An F32 llama-style GGUF with random weights: llama-quantize loads it (no vocabulary needed).
    With `vocab`, a GGUF whose tokenizer (and vocabulary size) it takes, llama.cpp runs it too; with
    `norm` 1, its norm weights are about 1, so every layer, not just the embeddings, shapes the logits."""
    w = gguf.GGUFWriter(str(path), arch)
    if vocab is not None:
        header = read_header(vocab, arrays=True)
        copy_metadata(w, header, skip=[k for k in header.metadata if not k.startswith("tokenizer.")])
        n_vocab = len(header.metadata["tokenizer.ggml.tokens"])
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    kv = n_embd // n_head * n_head_kv
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    if not tied:
        shapes["output.weight"] = (n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (n_embd,), p + "ffn_norm.weight": (n_embd,),
                   p + "attn_q.weight": (n_embd, n_embd), p + "attn_k.weight": (kv, n_embd),
                   p + "attn_v.weight": (kv, n_embd), p + "attn_output.weight": (n_embd, n_embd)}
        if n_expert:
            shapes |= {p + "ffn_gate_inp.weight": (n_expert, n_embd),
                       p + "ffn_gate_exps.weight": (n_expert, n_ff, n_embd),
                       p + "ffn_up_exps.weight": (n_expert, n_ff, n_embd),
                       p + "ffn_down_exps.weight": (n_expert, n_embd, n_ff)}
        else:
            shapes |= {p + "ffn_gate.weight": (n_ff, n_embd), p + "ffn_up.weight": (n_ff, n_embd),
                       p + "ffn_down.weight": (n_embd, n_ff)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32) * 0.05
        w.add_tensor(name, x + np.float32(norm) if name.endswith("_norm.weight") else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def identical_tensors(ours: Path, ref: Path) -> tuple[float, list[str]]:
    """(fraction of the reference's tensors with the same type and bytes in ours, names that differ)."""
    h_ours, h_ref = read_header(ours), read_header(ref)
    mine = {t.name: t for t in h_ours.tensors}
    differ = [t.name for t in h_ref.tensors
              if (o := mine.get(t.name)) is None or o.type != t.type
              or not np.array_equal(tensor_data(h_ours, o), tensor_data(h_ref, t))]
    return (len(h_ref.tensors) - len(differ)) / len(h_ref.tensors), differ


def dequantized_gguf(src: Path, out: Path) -> Path:
    """`src` with every tensor dequantized to F32 by gguf-py (llama.cpp's own Python package): the
    weights a quantized file stands for, for llama.cpp to run in float."""
    header = read_header(src, arrays=True)

    def data(t):
        shape = tuple(reversed(t.shape))
        return TensorOut(t.name, shape, Q.F32, [gguf.quants.dequantize(np.array(tensor_data(header, t)), t.type)
                                                .astype(np.float32).reshape(shape)])

    tensors = [data(t) for t in header.tensors]
    write_gguf(out, header.architecture, tensors, lambda w: copy_metadata(w, header), desc="dequantize")
    return out


def metadata(path: Path) -> dict:
    """KV pairs with their types (long arrays reduced to their length) and tensor order of a GGUF."""
    h = read_header(path, arrays=True)
    kv = {k: (h.value_types[k], len(v) if isinstance(v, list) and len(v) > 64 else v) for k, v in h.metadata.items()}
    return {"kv": kv, "order": [t.name for t in h.tensors]}


def real_matrix(path: Path, name: str, rows: int | None = None) -> np.ndarray:
    """The first `rows` rows of a GGUF's tensor, dequantized to float32 (rows, row_length)."""
    header = read_header(path)
    info = next(t for t in header.tensors if t.name == name)
    return gguf.quants.dequantize(np.array(tensor_data(header, info)[:rows]), info.type).astype(np.float32)


def needed_types(types: dict[str, Q]) -> set[Q]:
    return {t for t in types.values() if t not in (Q.F32, Q.F16, Q.BF16)}


ALL_MIXTURES = list(MIXTURES)
