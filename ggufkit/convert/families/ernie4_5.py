"""ERNIE 4.5 (dense): Llama's layout without the q/k permutation (its RoPE already rotates
interleaved pairs, llama.cpp's normal RoPE); a SentencePiece tokenizer with the space prefix of
tokenizer_config.json's add_prefix_space."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import Family, register


# transformers' name first (export-hf writes it); Baidu's original checkpoints say Ernie4_5_ForCausalLM
@register("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM")
class Ernie4_5(Family):
    arch = gguf.MODEL_ARCH.ERNIE4_5
    hf_model_type = "ernie4_5"
    tokenizers = ("sentencepiece",)
    reads_add_prefix_space = True
    export_head_dim = True
