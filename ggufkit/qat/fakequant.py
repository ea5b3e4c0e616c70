"""Fake quantization onto a tensor's GGUF grid. The forward pass rounds the weight exactly as
`convert --method ggml` will write it (the family's transform, kquants' search with the tensor's
importance weights, then dequantized and transformed back), so the written file holds exactly the
weights that were trained. The backward pass is straight-through inside the grid's range and zero
outside it, where rounding clips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ggufkit.convert.families import Family
from ggufkit.convert.pipeline import PlannedTensor
from ggufkit.errors import GgufkitError
from ggufkit.gptq import CODES, IQ4_LEVELS, IQ4_TYPES, element_grids
from ggufkit.kquants import dequantize, encode



@dataclass
class TensorQuantizer:
    """How one checkpoint tensor is written: its GGUF name and type, the family that transforms it,
    its importance weights (None: unweighted) and how many of its rows the GGUF keeps (token_embd
    drops padding rows past the tokenizer)."""
    hf_name: str
    gguf_name: str
    qtype: GGMLQuantizationType
    family: Family
    weights: np.ndarray | None
    rows: int

    def round(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the weight as the GGUF will hold it, where the straight-through gradient passes), both
        in the checkpoint's layout. Rows past `rows` are not written: they keep their values."""
        x = self.family.transform(self.hf_name, w[:self.rows])
        q = encode(x, self.qtype, self.weights)
        deq = dequantize(q, self.qtype).reshape(x.shape)
        out, mask = w.copy(), np.ones(w.shape, dtype=np.float32)
        out[:self.rows] = self.family.untransform(self.gguf_name, deq)
        if self.qtype in CODES:  # a matrix: its transform only reorders rows (Gemma's +1 is for norms)
            mask[:self.rows] = self.family.untransform(self.gguf_name, _inside_grid(x, q, self.qtype))
        return out, mask


def _inside_grid(x: np.ndarray, q: np.ndarray, qtype) -> np.ndarray:
    """1.0 where x lies within half a step of its block's grid range, else 0.0 (types in CODES;
    elsewhere, floats and the i-quants' lattices, the gradient passes everywhere)."""
    _, _, lo, hi = CODES[qtype]
    rows = x.reshape(-1, x.shape[-1])
    offset, step = element_grids(q.reshape(rows.shape[0], -1), qtype)
    if qtype in IQ4_TYPES:  # levels are multiples of the block scale: half the outer gaps beyond them
        a, b = step * (1.5 * IQ4_LEVELS[0] - 0.5 * IQ4_LEVELS[1]), step * (1.5 * IQ4_LEVELS[-1] - 0.5 * IQ4_LEVELS[-2])
    else:
        a, b = offset + step * (lo - 0.5), offset + step * (hi + 0.5)
    inside = (rows >= np.minimum(a, b)) & (rows <= np.maximum(a, b))
    return inside.astype(np.float32).reshape(x.shape)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
        out, mask = quantizer.round(w.detach().float().cpu().numpy())
        ctx.save_for_backward(torch.from_numpy(mask).to(w.device))
        return torch.from_numpy(out).to(w.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fake_quantize(w: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
    """`w` as the GGUF will hold it, with straight-through gradients."""
    return _FakeQuant.apply(w, quantizer)


def quantizers(fam: Family, tensors: list[PlannedTensor], weights: dict[str, np.ndarray],
               values: Callable[[str], np.ndarray], path) -> dict[str, TensorQuantizer]:
    """One quantizer per checkpoint tensor of the plan (every expert of a stacked tensor, each with
    its own importance weights). `values(name)`: a checkpoint tensor, to check that going back from
    the GGUF's layout to the checkpoint's and forth again gives the same GGUF values (training
    works in the checkpoint's layout; Gemma's norms, stored as 1 + w, lose low bits of w on the way,
    which the model's own 1 + w then restores)."""
    out = {}
    for t in tensors:
        if t.hf_name is None:  # computed from the config (rope_freqs): not trained
            continue
        cols = t.shape[-1]
        rows = t.shape[-2] if len(t.shape) > 1 else t.shape[0]
        for expert, hf_name in enumerate(t.sources):
            w = weights.get(t.gguf_name)
            if w is not None and w.size != cols:
                w = w[expert * cols:(expert + 1) * cols]
            y = fam.transform(hf_name, values(hf_name)[:rows])
            if not np.array_equal(fam.transform(hf_name, fam.untransform(t.gguf_name, y)), y):
                raise GgufkitError(f"{type(fam).__name__}: {hf_name} cannot be trained in the checkpoint's "
                                   "layout (its GGUF transform is not undone exactly)", path)
            out[hf_name] = TensorQuantizer(hf_name, t.gguf_name, t.qtype, fam, w, rows)
    return out
