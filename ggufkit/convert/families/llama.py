"""Llama 2 / 3 / 3.1 / 3.2 and Mistral: llama.cpp stores q/k rows permuted for its RoPE layout,
and Llama 3.1's frequency scaling as a rope_freqs tensor."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ggufkit.convert.families.base import Family, register
from ggufkit.convert.tokenizer import Vocab


def permute_qk(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half layout -> llama.cpp's interleaved pairs, per head."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_qk(x: np.ndarray, n_head: int) -> np.ndarray:
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(Family):
    arch = gguf.MODEL_ARCH.LLAMA
    hf_model_type = "llama"
    derived_head_dim = True  # head_dim is written even where config.json leaves it out
    reads_add_prefix_space = True
    llama3_rope_freqs = True

    @classmethod
    def reads_gguf(cls, kv: dict) -> bool:
        return f"{cls.arch_name()}.expert_count" not in kv  # those are Mixtral's

    def tokenizer_settings(self, root: Path, vocab: Vocab) -> None:
        super().tokenizer_settings(root, vocab)
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
