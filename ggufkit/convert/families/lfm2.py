"""LFM2: a hybrid of short gated convolutions and grouped-query attention (layer_types "conv" /
"full_attention"), each layer with a pre-norm (operator_norm) and a SwiGLU feed-forward (w1/w3/w2)
whose width is derived from the config as LLaMA's was (2/3 of it, rounded up to block_multiple_of);
per-head q/k norms; the final norm is model.embedding_norm. The convolution's (d, 1, L) weight is
written as (d, L), as llama.cpp's converter squeezes it."""

from __future__ import annotations

import gguf

from ggufkit.convert.checkpoint import Checkpoint
from ggufkit.convert.families.base import Family, layer_index, register
from ggufkit.errors import GgufkitError


def feed_forward_length(c: dict) -> int:
    """The FFN width LFM2 derives from its config (block_auto_adjust_ff_dim), as transformers and llama.cpp's
    converter do."""
    ff = c.get("block_ff_dim") or c["intermediate_size"]
    if c["block_auto_adjust_ff_dim"]:
        ff = int(2 * ff / 3)
        if c.get("block_ffn_dim_multiplier") is not None:
            ff = int(c["block_ffn_dim_multiplier"] * ff)
        multiple = c["block_multiple_of"]
        ff = multiple * ((ff + multiple - 1) // multiple)
    return ff


@register("Lfm2ForCausalLM", "LFM2ForCausalLM")
class Lfm2(Family):
    arch = gguf.MODEL_ARCH.LFM2
    hf_model_type = "lfm2"
    layer_norms = ("operator_norm", "ffn_norm")
    output_norm = "model.embedding_norm.weight"
    tokenizers = ("bpe",)

    def __init__(self, config: dict):
        super().__init__(config)
        c = self.config
        if c.get("conv_bias"):
            raise GgufkitError("LFM2 with convolution biases (conv_bias) is not supported")
        c.update(intermediate_size=feed_forward_length(c), rms_norm_eps=c["norm_eps"])
        self.conv = [t == "conv" for t in c["layer_types"]]

    @property
    def head_count_kv(self) -> list[int]:
        return [0 if conv else self.config["num_key_value_heads"] for conv in self.conv]  # none in conv layers

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_vocab_size(self.config["vocab_size"])
        w.add_shortconv_l_cache(self.config["conv_L_cache"])

    def _attention_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        d = c["hidden_size"]
        if self.conv[layer_index(p)]:
            return {p + "conv.conv.weight": (d, c["conv_L_cache"]), p + "conv.in_proj.weight": (3 * d, d),
                    p + "conv.out_proj.weight": (d, d)}
        hd, nkv = self.head_dim, c["num_key_value_heads"]
        a = p + "self_attn."
        return {a + "q_proj.weight": (d, d), a + "k_proj.weight": (nkv * hd, d), a + "v_proj.weight": (nkv * hd, d),
                a + "out_proj.weight": (d, d), a + "q_layernorm.weight": (hd,), a + "k_layernorm.weight": (hd,)}

    def _ffn_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        d, ff = self.config["hidden_size"], self.config["intermediate_size"]
        f = p + "feed_forward."
        return {f + "w1.weight": (ff, d), f + "w3.weight": (ff, d), f + "w2.weight": (d, ff)}

    def prepare(self, ckpt: Checkpoint) -> None:
        super().prepare(ckpt)
        for i in [i for i, conv in enumerate(self.conv) if conv]:
            if (name := f"model.layers.{i}.conv.conv.weight") in ckpt.tensors:
                ckpt.squeeze(name)

    def checkpoint_shape(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], 1, shape[1]) if hf_name.endswith("conv.conv.weight") else shape

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        heads_kv = kv[f"{a}.attention.head_count_kv"]  # per layer: none in the convolution layers
        cfg = super().config_from_gguf({**kv, f"{a}.attention.head_count_kv": max(heads_kv)}, n_vocab, tied)
        # the GGUF's FFN width is the derived one: taken as it is
        cfg.update(layer_types=["conv" if n == 0 else "full_attention" for n in heads_kv], norm_eps=cfg["rms_norm_eps"],
                   conv_L_cache=kv[f"{a}.shortconv.l_cache"], conv_bias=False, block_auto_adjust_ff_dim=False)
        return cfg
