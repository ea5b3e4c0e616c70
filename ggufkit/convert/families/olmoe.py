"""OLMoE: OLMo's q/k RMS norms over all heads (NeoX RoPE, no q/k permutation) with pre-norms as in
Llama, and a mixture-of-experts FFN in every layer (router mlp.gate, experts
mlp.experts.<e>.{gate,up,down}_proj, merged into ffn_*_exps); a BPE tokenizer."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import Experts, Family, register
from ggufkit.errors import GgufkitError

RMS_NORM_EPS = 1e-5  # llama.cpp's converter writes this whatever the config says


@register("OlmoeForCausalLM")
class Olmoe(Family):
    arch = gguf.MODEL_ARCH.OLMOE
    hf_model_type = "olmoe"
    qk_norm = "full"
    experts = Experts("mlp", "gate_proj", "up_proj", "down_proj", ff_key="intermediate_size")
    tokenizers = ("bpe",)

    def __init__(self, config: dict):
        super().__init__({**config, "rms_norm_eps": RMS_NORM_EPS})
        c = self.config
        if c.get("num_key_value_heads", c["num_attention_heads"]) != c["num_attention_heads"]:
            raise GgufkitError("OLMoE with grouped-query attention (num_key_value_heads < num_attention_heads) "
                               "is not supported: llama.cpp's k norm spans all query heads")

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        cfg.update(norm_topk_prob=False)  # llama.cpp's OLMoE graph does not renormalise the top-k weights
        return cfg
