"""GLM-4 (0414): q/k/v biases, one fused gate_up_proj kept fused (ffn_up, the gate's rows first),
sandwich norms (after attention and after the FFN too), RoPE over the first half of each head in
GPT-J's interleaved pairs (llama.cpp's normal RoPE: no q/k permutation); a BPE tokenizer whose
missing special tokens llama.cpp's converter takes from GLM's own added tokens."""

from __future__ import annotations

from pathlib import Path

import gguf

from ggufkit.convert.families.base import Family, register
from ggufkit.convert.tokenizer import Vocab, tokenizer_json
from ggufkit.errors import GgufkitError

# special token role -> GLM's added token llama.cpp's converter sets it to, where the tokenizer files set none
SPECIAL_TOKENS = {"eos": "<|endoftext|>", "eot": "<|user|>", "unk": "<|endoftext|>", "bos": "<|endoftext|>"}


@register("Glm4ForCausalLM")
class Glm4(Family):
    arch = gguf.MODEL_ARCH.GLM4
    hf_model_type = "glm4"
    attention_bias = True
    fused_gate_up = True
    layer_norms = ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")
    tokenizers = ("bpe",)
    export_head_dim = True

    @property
    def rope(self) -> dict:
        return {"partial_rotary_factor": 0.5, **super().rope}  # transformers' default for GLM-4

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_rope_dimension_count(int(self.head_dim * self.rope["partial_rotary_factor"]))

    def tokenizer_settings(self, root: Path, vocab: Vocab) -> None:
        added = {a["content"]: a["id"] for a in tokenizer_json(root).get("added_tokens", [])}
        for role, text in SPECIAL_TOKENS.items():
            if text not in added:
                raise GgufkitError(f"GLM-4's tokenizer has no {text} token", root / "tokenizer.json")
            vocab.special._set_special_token(role, added[text])  # gguf's setter: keeps an id the files set

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        cfg.update(attention_bias=True, partial_rotary_factor=kv[f"{a}.rope.dimension_count"] / head_dim)
        return cfg
