"""Gemma 3 (text): Gemma 2's sandwich norms and (1 + w) norm weights, with q/k norms, tied embeddings."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import Family, register
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
class Gemma3Multimodal(Gemma3):
    """Gemma 3's image-text checkpoints (4B, 12B, 27B): the text model, as llama.cpp converts it (the
    vision tower and projector belong in a separate mmproj file). Its tensors sit under
    language_model.model. (Google's release) or model.language_model. (later transformers)."""

    PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                "language_model.lm_head.": "lm_head."}
    OTHER_PARTS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith(self.OTHER_PARTS):
            return None
        for prefix, text in self.PREFIXES.items():
            if name.startswith(prefix):
                return text + name[len(prefix):]
        return name
