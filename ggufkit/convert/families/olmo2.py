"""OLMo 2: norms after attention and after the FFN (none before them), q/k RMS norms over all heads,
no q/k permutation (NeoX RoPE), a BPE tokenizer."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import Family, register


@register("Olmo2ForCausalLM")
class Olmo2(Family):
    arch = gguf.MODEL_ARCH.OLMO2
    hf_model_type = "olmo2"
    qk_norm = "full"
    layer_norms = ("post_attention_layernorm", "post_feedforward_layernorm")
    tokenizers = ("bpe",)
