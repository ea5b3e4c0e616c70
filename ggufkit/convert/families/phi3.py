"""Phi-3 and Phi-4: fused qkv_proj and gate_up_proj, kept fused as llama.cpp stores them (attn_qkv;
ffn_up with the gate's rows first), no q/k permutation (NeoX RoPE), LongRoPE factors as tensors.
Phi-3 has a SentencePiece tokenizer whose added tokens llama.cpp's converter reads its own way;
Phi-4 a BPE one (tokenizer_class GPT2Tokenizer)."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from ggufkit.convert.families.base import Family, register
from ggufkit.convert.tokenizer import Vocab, tokenizer_config
from ggufkit.errors import GgufkitError


@register("Phi3ForCausalLM")
class Phi3(Family):
    arch = gguf.MODEL_ARCH.PHI3
    hf_model_type = "phi3"
    fused_qkv = True
    fused_gate_up = True
    verbatim_added_tokens = True

    def load_vocab(self, root: Path) -> Vocab:
        gpt2 = tokenizer_config(root).get("tokenizer_class") == "GPT2Tokenizer"
        self.tokenizers = ("bpe",) if gpt2 else ("sentencepiece",)
        return super().load_vocab(root)

    @property
    def rope_dims(self) -> int:
        c = self.config
        return int(self.rope.get("partial_rotary_factor", 1.0) * c["hidden_size"]) // c["num_attention_heads"]

    def _long_rope(self) -> tuple[float, list, list] | None:
        """(attention factor, long factors, short factors) of a LongRoPE (128k) model, as llama.cpp's
        converter computes them; None for a model without."""
        rope, c = self.rope, self.config
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not long:
            return None
        orig = rope["original_max_position_embeddings"]
        scale = self.config_value("n_positions", "max_position_embeddings") / orig
        kind = rope.get("rope_type", "").lower()
        if kind in ("su", "longrope"):
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        elif kind == "yarn":
            attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise GgufkitError(f"unsupported rope_scaling type {kind!r} for Phi-3 (longrope, su or yarn)")
        if short is None or len(long) != len(short) or len(long) != self.rope_dims / 2:
            raise GgufkitError(f"rope long and short factors must have {self.rope_dims // 2} values each")
        return attn, long, short

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_context_length(self.config_value("n_positions", "max_position_embeddings"))
        w.add_rope_scaling_orig_ctx_len(self.rope["original_max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_block_count(self.n_layer)
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(c["num_key_value_heads"])
        w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        w.add_rope_dimension_count(self.rope_dims)
        w.add_rope_freq_base(self.rope["rope_theta"])
        # 0 tells Phi-4 (no sliding window) from Phi-3
        w.add_sliding_window(c.get("sliding_window") or 0)
        if (long_rope := self._long_rope()) is not None:
            w.add_rope_scaling_attn_factors(long_rope[0])

    def extra_tensors(self):
        if (long_rope := self._long_rope()) is not None:
            for key, factors in zip((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT),
                                    long_rope[1:]):
                yield gguf.TENSOR_NAMES[key] + ".weight", np.array(factors, dtype=np.float32)

    @classmethod
    def config_from_tensors(cls, cfg: dict, values) -> dict:
        """LongRoPE's factors, which the GGUF keeps as tensors (its attention factor follows from the
        context lengths in transformers, as in llama.cpp's converter)."""
        long = values(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight")
        if long is None:
            return cfg
        short = values(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight")
        cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": cfg["rope_theta"],
                                  "long_factor": long.tolist(), "short_factor": short.tolist(),
                                  "original_max_position_embeddings": cfg["original_max_position_embeddings"]}
        return cfg

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg.update(original_max_position_embeddings=kv.get(f"{a}.rope.scaling.original_context_length",
                                                           cfg["max_position_embeddings"]),
                   sliding_window=kv.get(f"{a}.attention.sliding_window") or None,
                   partial_rotary_factor=kv.get(f"{a}.rope.dimension_count", head_dim) / head_dim)
        return cfg
