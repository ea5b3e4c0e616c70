"""Gemma 2: sandwich norms (pre- and post-attention, pre- and post-FFN), logit soft-capping, tied
embeddings, a SentencePiece tokenizer without a space prefix. HF's RMSNorm multiplies by (1 + w),
llama.cpp's by w, so norm weights are shifted by one (Gemma 3 shares this)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ggufkit.convert.families.base import Family, register
from ggufkit.convert.tokenizer import Vocab

GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm")


class GemmaNorms:
    """What Gemma 2 and 3 share: (1 + w) norms, and SentencePiece vocabularies without a space prefix."""

    def transform(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        return x + np.float32(1.0) if hf_name.endswith("norm.weight") else x

    def untransform(self, gguf_name: str, x: np.ndarray) -> np.ndarray:
        return x - np.float32(1.0) if gguf_name.endswith("norm.weight") else x

    def tokenizer_settings(self, root: Path, vocab: Vocab) -> None:
        if vocab.model == "llama":
            vocab.add_space_prefix = False


@register("Gemma2ForCausalLM")
class Gemma2(GemmaNorms, Family):
    arch = gguf.MODEL_ARCH.GEMMA2
    hf_model_type = "gemma2"
    layer_norms = GEMMA_NORMS
    tokenizers = ("sentencepiece",)

    def __init__(self, config: dict):
        # llama.cpp's converter drops lm_head.weight (Gemma 2 always ties it to the embedding)
        super().__init__({**config, "tie_word_embeddings": True})

    def checkpoint_name(self, name: str) -> str | None:
        return None if name == "lm_head.weight" else name

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        # llama.cpp's converter writes Gemma 2's own short list (no RoPE base: llama.cpp's default)
        c = self.config
        w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_block_count(self.n_layer)
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(c.get("num_key_value_heads", c["num_attention_heads"]))
        w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
        w.add_sliding_window(c["sliding_window"])

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        head_dim = kv[f"{a}.attention.key_length"]
        # llama.cpp scales attention by 1/sqrt(head_dim), the 27B model (46 layers) by 1/sqrt(d / heads)
        scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if cfg["num_hidden_layers"] == 46 else head_dim
        cfg.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", head_dim=head_dim,
                   query_pre_attn_scalar=scalar,
                   attn_logit_softcapping=kv[f"{a}.attn_logit_softcapping"],
                   final_logit_softcapping=kv[f"{a}.final_logit_softcapping"],
                   sliding_window=kv[f"{a}.attention.sliding_window"])
        return cfg
