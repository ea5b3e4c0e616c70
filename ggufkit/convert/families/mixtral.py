"""Mixtral: Llama's attention (q/k rows permuted), tokenizer handling and GGUF architecture, with a
mixture-of-experts FFN (router block_sparse_moe.gate, experts w1/w3/w2 = gate/up/down, merged into
ffn_*_exps)."""

from __future__ import annotations

from ggufkit.convert.families.base import Experts, register
from ggufkit.convert.families.llama import Llama


@register("MixtralForCausalLM")
class Mixtral(Llama):
    hf_model_type = "mixtral"
    derived_head_dim = False  # transformers' MixtralConfig leaves head_dim None
    experts = Experts("block_sparse_moe", "w1", "w3", "w2", ff_key="intermediate_size",
                      count_key="num_local_experts")

    @classmethod
    def reads_gguf(cls, kv: dict) -> bool:
        return f"{cls.arch_name()}.expert_count" in kv
