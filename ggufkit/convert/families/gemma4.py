"""Gemma 4 (text): the language model of Gemma4ForConditionalGeneration (its vision and audio towers
left out, as for Gemma 3) or Gemma4ForCausalLM. Gemma's sandwich norms, here unshifted (Gemma 4's
RMSNorm multiplies by w, as llama.cpp's), per-head q/k norms, and a scalar on each layer's output.
Sliding-window layers and full-attention layers differ in head size and may in key/value heads
(per_layer_config); with attention_k_eq_v the full layers have no v_proj (values are the keys).
The full layers' 'proportional' RoPE turns only part of each head: llama.cpp gets that as a
rope_freqs tensor whose unrotated dimensions have an infinite divisor. The tokenizer.json is read
as gguf's LlamaHfVocab reads it, under llama.cpp's gemma4 tokenizer model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ggufkit.convert.families.base import Family, ImageTextModel, layer_index, register
from ggufkit.convert.families.gemma2 import GEMMA_NORMS
from ggufkit.convert.tokenizer import Vocab, load_sentencepiece_bpe
from ggufkit.errors import GgufkitError

# Gemma 4's variants whose extra parts ggufkit does not convert (yet): config key -> what it is
UNSUPPORTED = {"hidden_size_per_layer_input": "per-layer input embeddings (E2B, E4B)",
               "num_kv_shared_layers": "layers sharing keys and values (E2B, E4B)",
               "enable_moe_block": "a mixture of experts (26B-A4B)",
               "use_double_wide_mlp": "double-wide MLPs in shared-KV layers"}
# tokens the chat parser must see: llama.cpp's converter types them USER_DEFINED, so they are rendered
VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                  '<|"|>'}
# the rope_freqs divisor of a dimension the proportional RoPE leaves unrotated
UNROTATED = 1e30


@register("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM")
class Gemma4(ImageTextModel, Family):
    arch = gguf.MODEL_ARCH.GEMMA4
    hf_model_type = "gemma4_text"
    qk_norm = "head"
    layer_norms = GEMMA_NORMS
    OTHER_PARTS = (*ImageTextModel.OTHER_PARTS, "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")

    def __init__(self, config: dict):
        super().__init__(config)
        c = self.config
        for key, what in UNSUPPORTED.items():
            if c.get(key):
                raise GgufkitError(f"Gemma 4 with {what} ({key}) is not supported")
        self.sliding = [t == "sliding_attention" for t in c["layer_types"]]
        overrides = {int(i): layer for i, layer in (c.get("per_layer_config") or {}).items()}
        self.layers = [{"head_dim": c["head_dim"], "num_key_value_heads": c["num_key_value_heads"],
                        **overrides.get(i, {})} for i in range(self.n_layer)]
        # llama.cpp's converter takes the full layers' sizes from the first full layer that sets them
        full = [overrides[i] for i in sorted(overrides) if i < self.n_layer and not self.sliding[i]]
        self.full_head_dim = c.get("global_head_dim") or next((o["head_dim"] for o in full if "head_dim" in o), None)
        self.full_kv_heads = c.get("num_global_key_value_heads") or next(
            (o["num_key_value_heads"] for o in full if "num_key_value_heads" in o), None)
        if self.full_head_dim is None:
            raise GgufkitError("Gemma 4 config without the full-attention layers' head size "
                               "(global_head_dim or per_layer_config)")

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        super().write_hparams(w)
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(c["final_logit_softcapping"])
        w.add_sliding_window(c["sliding_window"])
        w.add_shared_kv_layers(c.get("num_kv_shared_layers") or 0)
        w.add_embedding_length_per_layer_input(c.get("hidden_size_per_layer_input") or 0)
        w.add_sliding_window_pattern(self.sliding)
        w.add_key_length_swa(c["head_dim"])
        w.add_value_length_swa(c["head_dim"])
        w.add_rope_dimension_count(self.full_head_dim)
        partial = (c.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)  # top level: as the converter
        w.add_rope_dimension_count_swa(int(c["head_dim"] * partial))

    @property
    def head_count_kv(self) -> int | list[int]:
        c = self.config
        if self.full_kv_heads is None:
            return c["num_key_value_heads"]
        return [c["num_key_value_heads"] if sliding else self.full_kv_heads for sliding in self.sliding]

    @property
    def attention_lengths(self) -> tuple[int, int]:
        return self.full_head_dim, self.full_head_dim  # the sliding layers' go in key_length_swa

    def _attention_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        i = layer_index(p)
        d, nq = self.config["hidden_size"], self.config["num_attention_heads"]
        hd, nkv = self.layers[i]["head_dim"], self.layers[i]["num_key_value_heads"]
        a = p + "self_attn."
        out = {a + "q_proj.weight": (nq * hd, d), a + "k_proj.weight": (nkv * hd, d),
               a + "v_proj.weight": (nkv * hd, d), a + "o_proj.weight": (d, nq * hd),
               a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)}
        if self.config.get("attention_k_eq_v") and not self.sliding[i]:
            del out[a + "v_proj.weight"]
        return out

    def _ffn_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        return {**super()._ffn_tensors(p), p + "layer_scalar": (1,)}

    def gguf_name(self, hf_name: str) -> str | None:
        # llama.cpp's converter names the layer scalar as a weight
        return super().gguf_name(hf_name + ".weight" if hf_name.endswith(".layer_scalar") else hf_name)

    def _rope_freqs(self) -> np.ndarray:
        full = self.rope
        if full.get("rope_type") != "proportional":
            raise GgufkitError(f"Gemma 4 full-attention RoPE type {full.get('rope_type')!r} is not supported "
                               "(llama.cpp's converter takes 'proportional')")
        n_rot = int(self.full_head_dim * full["partial_rotary_factor"] / 2)
        return np.array([1.0] * n_rot + [UNROTATED] * (self.full_head_dim // 2 - n_rot), np.float32)

    def extra_tensors(self):
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", self._rope_freqs()

    def load_vocab(self, root: Path) -> Vocab:
        vocab = load_sentencepiece_bpe(root, "gemma4")
        vocab.types = [gguf.TokenType.USER_DEFINED if t in VISIBLE_TOKENS else kind
                       for t, kind in zip(vocab.tokens, vocab.types)]
        vocab.add_space_prefix = False
        vocab.special.add_special_token["bos"] = True
        return vocab

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        sliding = kv[f"{a}.attention.sliding_window_pattern"]
        heads_kv = kv[f"{a}.attention.head_count_kv"]
        heads_kv = heads_kv if isinstance(heads_kv, list) else [heads_kv] * len(sliding)
        swa_heads_kv = next((n for n, s in zip(heads_kv, sliding) if s), heads_kv[0])
        cfg = super().config_from_gguf({**kv, f"{a}.attention.head_count_kv": swa_heads_kv}, n_vocab, tied)
        del cfg["rope_theta"]  # in rope_parameters, per kind of layer
        # the full layers' sizes as transformers writes them (per_layer_config), which the converter reads back
        full = {str(i): {"head_dim": kv[f"{a}.attention.key_length"], "num_key_value_heads": n}
                for i, (n, s) in enumerate(zip(heads_kv, sliding)) if not s}
        cfg.update(architectures=["Gemma4ForCausalLM"], hidden_activation="gelu_pytorch_tanh",
                   hidden_act="gelu_pytorch_tanh", head_dim=kv[f"{a}.attention.key_length_swa"], per_layer_config=full,
                   layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
                   sliding_window=kv[f"{a}.attention.sliding_window"],
                   final_logit_softcapping=kv.get(f"{a}.final_logit_softcapping"),
                   hidden_size_per_layer_input=kv[f"{a}.embedding_length_per_layer_input"],
                   num_kv_shared_layers=kv[f"{a}.attention.shared_kv_layers"],
                   rope_parameters={"full_attention": {"rope_type": "proportional",
                                                       "rope_theta": kv[f"{a}.rope.freq_base"]},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": kv[f"{a}.rope.freq_base_swa"]}})
        return cfg

    @classmethod
    def config_from_tensors(cls, cfg: dict, values: Callable[[str], np.ndarray | None]) -> dict:
        full = [int(i) for i in cfg["per_layer_config"]]
        # keys serve as values where the full layers have no attn_v
        cfg["attention_k_eq_v"] = bool(full) and all(values(f"blk.{i}.attn_v.weight") is None for i in full)
        # the rotated part of a full layer's head: the dimensions rope_freqs divides by 1 (all, without it)
        freqs = values(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight")
        rotated = 1.0 if freqs is None else np.count_nonzero(freqs == 1) / len(freqs)
        cfg["rope_parameters"]["full_attention"]["partial_rotary_factor"] = rotated
        return cfg
