"""Qwen3 (dense): per-head q/k RMS norms, no attention biases."""

import gguf

from ggufkit.convert.families.base import Family, register


@register("Qwen3ForCausalLM")
class Qwen3(Family):
    arch = gguf.MODEL_ARCH.QWEN3
    hf_model_type = "qwen3"
    qk_norm = "head"
