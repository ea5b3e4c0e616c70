"""Llama 2 / 3 / 3.1 / 3.2 and Mistral: llama.cpp stores q/k rows permuted for its RoPE layout,
and Llama 3.1's frequency scaling as a rope_freqs tensor."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from ggufkit.convert.families.base import Family, register
from ggufkit.convert.tokenizer import Vocab, tokenizer_config


def permute_qk(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half layout -> llama.cpp's interleaved pairs, per head."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_qk(x: np.ndarray, n_head: int) -> np.ndarray:
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's 'llama3' rope scaling (what llama.cpp reads as rope_freqs)."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    # float32 throughout, as llama.cpp's converter computes it
    wavelen = np.float32(2 * math.pi) / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid)).astype(np.float32)


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(Family):
    arch = gguf.MODEL_ARCH.LLAMA
    hf_model_type = "llama"
    derived_head_dim = True  # head_dim is written even where config.json leaves it out

    @classmethod
    def reads_gguf(cls, kv: dict) -> bool:
        return f"{cls.arch_name()}.expert_count" not in kv  # those are Mixtral's

    def tokenizer_settings(self, root: Path, vocab: Vocab) -> None:
        if (prefix := tokenizer_config(root).get("add_prefix_space")) is not None:
            vocab.add_space_prefix = prefix
        if self.config.get("vocab_size") == 49152:  # llama.cpp's converter: Granite's small models (and SmolLM's)
            vocab.special.add_special_token["bos"] = False

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_vocab_size(self.config["vocab_size"])
        w.add_rope_dimension_count(self.head_dim)
        if "head_dim" not in self.config and self.derived_head_dim:
            # transformers' LlamaConfig derives it, so llama.cpp's converter sees it
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)

    def _heads_for(self, name: str) -> int | None:
        c = self.config
        if ".q_proj." in name or ".attn_q." in name:
            return c["num_attention_heads"]
        if ".k_proj." in name or ".attn_k." in name:
            return c.get("num_key_value_heads", c["num_attention_heads"])
        return None

    def transform(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        n = self._heads_for(hf_name)
        return x if n is None else permute_qk(x, n)

    def row_local(self, hf_name: str) -> bool:
        return self._heads_for(hf_name) is None

    def untransform(self, gguf_name: str, x: np.ndarray) -> np.ndarray:
        n = self._heads_for(gguf_name)
        return x if n is None else unpermute_qk(x, n)

    def extra_tensors(self):
        if self.rope.get("rope_type", "").lower() == "llama3":
            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(self.rope, self.head_dim)
