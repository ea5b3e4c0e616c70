"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with a mixture-of-experts FFN in every layer
(router mlp.gate, experts mlp.experts.<e>.{gate,up,down}_proj, merged into ffn_*_exps)."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import Experts, Family, register
from ggufkit.errors import GgufkitError


@register("Qwen3MoeForCausalLM")
class Qwen3Moe(Family):
    arch = gguf.MODEL_ARCH.QWEN3MOE
    hf_model_type = "qwen3_moe"
    qk_norm = "head"
    experts = Experts("mlp", "gate_proj", "up_proj", "down_proj", ff_key="moe_intermediate_size")
    export_head_dim = True

    def __init__(self, config: dict):
        super().__init__(config)
        c = self.config
        if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
            raise GgufkitError("Qwen3-MoE with dense layers (mlp_only_layers, decoder_sparse_step) is not "
                               "supported: llama.cpp runs experts in every layer")

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_expert_feed_forward_length(self.config["moe_intermediate_size"])
        if (shared := self.config.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(shared)

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        cfg.update(norm_topk_prob=True, moe_intermediate_size=kv[f"{a}.expert_feed_forward_length"],
                   decoder_sparse_step=1, mlp_only_layers=[])
        return cfg
