"""Gemma 3 (text): Gemma 2's sandwich norms and (1 + w) norm weights, with q/k norms, tied embeddings."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import Family, ImageTextModel, register
from ggufkit.convert.families.gemma2 import GEMMA_NORMS, GemmaNorms


@register("Gemma3ForCausalLM")
class Gemma3(GemmaNorms, Family):
    arch = gguf.MODEL_ARCH.GEMMA3
    hf_model_type = "gemma3_text"
    qk_norm = "head"
    layer_norms = GEMMA_NORMS

    def __init__(self, config: dict):
        # Gemma's configs leave these to transformers' defaults; llama.cpp must be told explicitly.
        defaults = {"tie_word_embeddings": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                    "head_dim": 256, "num_attention_heads": 8, "num_key_value_heads": 4, "rope_theta": 1e6}
        super().__init__({**defaults, **config})

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        super().write_hparams(w)
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(c["final_logit_softcapping"])
        if c.get("sliding_window_pattern") != 1:
            w.add_sliding_window(c["sliding_window"])

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        cfg.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                   head_dim=kv.get(f"{a}.attention.key_length", 256),
                   sliding_window=kv.get(f"{a}.attention.sliding_window", 512),
                   query_pre_attn_scalar=kv.get(f"{a}.attention.key_length", 256),
                   rope_local_base_freq=kv.get(f"{a}.rope.freq_base_swa", 10000.0))
        return cfg


@register("Gemma3ForConditionalGeneration")
class Gemma3Multimodal(ImageTextModel, Gemma3):
    """Gemma 3's image-text checkpoints (4B, 12B, 27B)."""
