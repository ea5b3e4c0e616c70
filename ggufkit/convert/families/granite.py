"""Granite (3.x dense): Llama's layout and tokenizer handling, with scaling multipliers (attention,
embedding, residual, logits); llama.cpp ignores a config's head_dim for it."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import register
from ggufkit.convert.families.llama import Llama

# config key -> GGUF key suffix, as llama.cpp's converter renames the multipliers
SCALES = {"attention_multiplier": "attention.scale", "embedding_multiplier": "embedding_scale",
          "residual_multiplier": "residual_scale", "logits_scaling": "logit_scale"}


@register("GraniteForCausalLM")
class Granite(Llama):
    arch = gguf.MODEL_ARCH.GRANITE
    hf_model_type = "granite"
    derived_head_dim = False

    def __init__(self, config: dict):
        super().__init__({k: v for k, v in config.items() if k != "head_dim"})

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        for key, suffix in SCALES.items():
            if value := self.config.get(key):
                w.add_float32(f"{self.arch_name()}.{suffix}", value)

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        cfg.update({key: kv.get(f"{cls.arch_name()}.{suffix}", 1.0) for key, suffix in SCALES.items()})
        return cfg
