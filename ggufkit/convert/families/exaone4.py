"""EXAONE 4.0: norms after attention and after the FFN (none before them, as OLMo 2), per-head q/k
RMS norms, NeoX RoPE (no q/k permutation) with 'llama3' scaling as a rope_freqs tensor; sliding-window
layers where the config has a window (llama.cpp runs them, and RoPE only in them, for the 32B model's
64 layers); a BPE tokenizer."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import Family, register


@register("Exaone4ForCausalLM")
class Exaone4(Family):
    arch = gguf.MODEL_ARCH.EXAONE4
    hf_model_type = "exaone4"
    qk_norm = "head"
    layer_norms = ("post_attention_layernorm", "post_feedforward_layernorm")
    tokenizers = ("bpe",)
    llama3_rope_freqs = True

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        c = self.config
        w.add_vocab_size(c["vocab_size"])
        if c.get("sliding_window") is not None:
            w.add_sliding_window(c["sliding_window"])
            if (sliding := self.sliding_layers()) is not None:
                w.add_sliding_window_pattern(sliding)

    def sliding_layers(self) -> list[bool] | None:
        """Which layers attend through the sliding window, as llama.cpp's converter reads it: from
        layer_types, else sliding_window_pattern ("LLLG": L local, G global, repeated; or n: every
        nth layer global); None where the config says neither."""
        c = self.config
        if c.get("layer_types") is not None:
            return [t == "sliding_attention" for t in c["layer_types"]]
        pattern = c.get("sliding_window_pattern")
        if isinstance(pattern, str):
            return [pattern[i % len(pattern)] == "L" for i in range(self.n_layer)]
        if isinstance(pattern, int):
            return [(i + 1) % pattern != 0 for i in range(self.n_layer)]
        return None

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        sliding = kv.get(f"{a}.attention.sliding_window_pattern") or [False] * cfg["num_hidden_layers"]
        cfg.update(sliding_window=kv.get(f"{a}.attention.sliding_window"),
                   layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
        return cfg
