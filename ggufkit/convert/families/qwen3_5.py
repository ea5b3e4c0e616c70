"""Qwen3.5, dense and mixture-of-experts: Qwen3-Next's layers (gated DeltaNet three in four, gated
attention in the others, the multi-token-prediction layer as llama.cpp's nextn block), in image-text
checkpoints whose text model converts as llama.cpp's converter converts it (the vision tower left
out). What differs from Qwen3-Next: DeltaNet's input projections are stored apart (in_proj_qkv,
in_proj_z, in_proj_b, in_proj_a -> attn_qkv, attn_gate, ssm_beta, ssm_alpha); where value heads
outnumber key heads, llama.cpp takes them tiled ([k0, k1, k0, k1, ...]) rather than grouped by key
head, so that its broadcast needs no interleaving: the value rows of qkv, z, b, a, A, dt and the
convolution, and out_proj's columns, are reordered; the interleaved M-RoPE sections are written; the
dense model's FFN is a plain gated MLP."""

from __future__ import annotations

import gguf
import numpy as np

from ggufkit.convert.families.base import ImageTextModel, register
from ggufkit.convert.families.qwen3next import Qwen3Next

# Qwen3.5's rotary sections where rope_parameters has none (transformers' default), as llama.cpp's converter writes them
MROPE_SECTIONS = [11, 11, 10]
# DeltaNet tensors indexed by value head (rows; out_proj: columns) -> (whether their value rows follow the q and
# k rows, whether a value head spans linear_value_head_dim rows rather than one)
VALUE_ROWS = {"in_proj_qkv.weight": (True, True), "conv1d.weight": (True, True), "in_proj_z.weight": (False, True),
              "out_proj.weight": (False, True), "in_proj_b.weight": (False, False),
              "in_proj_a.weight": (False, False), "A_log": (False, False), "dt_bias": (False, False)}


def tile_value_heads(x: np.ndarray, n_key_heads: int, head_size: int, axis: int = 0) -> np.ndarray:
    """Value heads along `axis` grouped by key head ([g0v0, g0v1, g1v0, g1v1]) -> tiled ([g0v0, g1v0, g0v1, g1v1])."""
    x = np.moveaxis(x, axis, 0)
    tiled = x.reshape(n_key_heads, -1, head_size, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
    return np.ascontiguousarray(np.moveaxis(tiled, 0, axis))


@register("Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM")
class Qwen3_5(ImageTextModel, Qwen3Next):
    arch = gguf.MODEL_ARCH.QWEN35
    hf_model_type = "qwen3_5_text"
    experts = None

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        sections = self.rope.get("mrope_section", MROPE_SECTIONS)
        w.add_rope_dimension_sections([*sections, 0, 0, 0, 0][:4])

    def _attention_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        out = super()._attention_tensors(p)
        if (ba := out.pop(p + "linear_attn.in_proj_ba.weight", None)) is not None:
            half = (ba[0] // 2, ba[1])
            out.update({p + "linear_attn.in_proj_b.weight": half, p + "linear_attn.in_proj_a.weight": half})
        return out

    def _value_head_layout(self, hf_name: str) -> tuple[int, int] | None:
        """(offset, head size) of the value heads in a DeltaNet tensor that llama.cpp takes tiled, or None."""
        c = self.config
        nk, tail = c["linear_num_key_heads"], hf_name.rpartition(".linear_attn.")[2]
        if nk == c["linear_num_value_heads"] or ".linear_attn." not in hf_name or tail not in VALUE_ROWS:
            return None
        after_qk, per_dim = VALUE_ROWS[tail]
        return 2 * nk * c["linear_key_head_dim"] if after_qk else 0, c["linear_value_head_dim"] if per_dim else 1

    def transform(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        if (layout := self._value_head_layout(hf_name)) is not None:
            offset, size = layout
            nk = self.config["linear_num_key_heads"]
            if hf_name.endswith("out_proj.weight"):
                x = tile_value_heads(x, nk, size, axis=1)
            else:
                x = np.concatenate([x[:offset], tile_value_heads(x[offset:], nk, size)])
        return super().transform(hf_name, x)

    def row_local(self, hf_name: str) -> bool:
        return hf_name.endswith("out_proj.weight") or self._value_head_layout(hf_name) is None


@register("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM")
class Qwen3_5Moe(Qwen3_5):
    arch = gguf.MODEL_ARCH.QWEN35MOE
    hf_model_type = "qwen3_5_moe_text"
    experts = Qwen3Next.experts
