"""Qwen2 / Qwen2.5: llama-shaped, with q/k/v biases and no q/k permutation."""

import gguf

from ggufkit.convert.families.base import Family, register


@register("Qwen2ForCausalLM")
class Qwen2(Family):
    arch = gguf.MODEL_ARCH.QWEN2
    hf_model_type = "qwen2"
    attention_bias = True
