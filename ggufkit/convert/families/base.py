"""What every decoder-only family shares: the HF config -> GGUF hyper-parameters that llama.cpp's
converter writes for all text models, the tensor name map (from gguf), and the llama-style tensor
list used to check a checkpoint against its config. Families override only what differs."""

from __future__ import annotations

from typing import Iterable

import gguf
import numpy as np

FAMILIES: dict[str, type["Family"]] = {}


def register(*architectures: str):
    def wrap(cls):
        cls.architectures = architectures
        for a in architectures:
            FAMILIES[a] = cls
        return cls
    return wrap


class Family:
    architectures: tuple[str, ...] = ()
    arch: gguf.MODEL_ARCH
    hf_model_type: str  # config.json's model_type, for export-hf
    attention_bias = False  # q/k/v biases (Qwen2)
    qk_norm = False  # per-head q/k RMS norms (Qwen3, Gemma 3)
    sandwich_norms = False  # extra post-attention / pre- and post-FFN norms (Gemma 3)

    def __init__(self, config: dict):
        # Multimodal wrappers keep the language model's settings under text_config.
        self.config = {**config, **config.get("text_config", {})}
        self.n_layer = self.config["num_hidden_layers"]
        self.name_map = gguf.get_tensor_name_map(self.arch, self.n_layer)

    @classmethod
    def arch_name(cls) -> str:
        return gguf.MODEL_ARCH_NAMES[cls.arch]

    # --- hyper-parameters -------------------------------------------------------------------
    @property
    def rope(self) -> dict:
        c = self.config
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope = rope.get("full_attention", rope)
        if "rope_theta" not in rope and "rope_theta" in c:
            rope["rope_theta"] = c["rope_theta"]
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        return rope

    @property
    def swa_rope_theta(self) -> float | None:
        """RoPE base of the sliding-window layers, where a model has its own for them (Gemma 3)."""
        c = self.config
        params = c.get("rope_parameters") or {}
        return params.get("sliding_attention", {}).get("rope_theta", c.get("rope_local_base_freq"))

    @property
    def head_dim(self) -> int:
        c = self.config
        return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_block_count(self.n_layer)
        if "max_position_embeddings" in c:
            w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(c["num_attention_heads"])
        if "num_key_value_heads" in c:
            w.add_head_count_kv(c["num_key_value_heads"])
        rope = self.rope
        if rope.get("rope_type") == "linear" and rope.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope.get("rope_type") == "yarn" and rope.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("rope_theta") is not None:
            w.add_rope_freq_base(rope["rope_theta"])
        if (swa_theta := self.swa_rope_theta) is not None:
            w.add_rope_freq_base_swa(swa_theta)
        if "rms_norm_eps" in c:
            w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        if c.get("head_dim") is not None:
            w.add_key_length(c["head_dim"])
            w.add_value_length(c["head_dim"])

    # --- tensors ----------------------------------------------------------------------------
    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape the config implies, in the order they are written."""
        c = self.config
        d, ff, hd = c["hidden_size"], c["intermediate_size"], self.head_dim
        nq, nkv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        out = {"model.embed_tokens.weight": (c["vocab_size"], d)}
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (d,)
            out[p + "self_attn.q_proj.weight"] = (nq * hd, d)
            out[p + "self_attn.k_proj.weight"] = (nkv * hd, d)
            out[p + "self_attn.v_proj.weight"] = (nkv * hd, d)
            if self.attention_bias:
                out[p + "self_attn.q_proj.bias"] = (nq * hd,)
                out[p + "self_attn.k_proj.bias"] = (nkv * hd,)
                out[p + "self_attn.v_proj.bias"] = (nkv * hd,)
            if self.qk_norm:
                out[p + "self_attn.q_norm.weight"] = (hd,)
                out[p + "self_attn.k_norm.weight"] = (hd,)
            out[p + "self_attn.o_proj.weight"] = (d, nq * hd)
            out[p + "post_attention_layernorm.weight"] = (d,)
            if self.sandwich_norms:
                out[p + "pre_feedforward_layernorm.weight"] = (d,)
                out[p + "post_feedforward_layernorm.weight"] = (d,)
            out[p + "mlp.gate_proj.weight"] = (ff, d)
            out[p + "mlp.up_proj.weight"] = (ff, d)
            out[p + "mlp.down_proj.weight"] = (d, ff)
        out["model.norm.weight"] = (d,)
        if not c.get("tie_word_embeddings", False):
            out["lm_head.weight"] = (c["vocab_size"], d)
        return out

    def checkpoint_name(self, name: str) -> str | None:
        """The language model's name for a checkpoint tensor, or None for a tensor of another part
        (a vision tower) that the text GGUF leaves out."""
        return name

    def ignored(self, hf_name: str) -> bool:
        """Checkpoint entries that carry no weights for llama.cpp (recomputed buffers)."""
        return hf_name.endswith("rotary_emb.inv_freq")

    def gguf_name(self, hf_name: str) -> str | None:
        return self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def transform(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        return x

    def row_local(self, hf_name: str) -> bool:
        """Whether `transform` works on any block of rows (so big tensors can be streamed in chunks)."""
        return True

    def untransform(self, gguf_name: str, x: np.ndarray) -> np.ndarray:
        """The inverse of `transform`, for export-hf."""
        return x

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        return ()

    # --- export-hf: GGUF metadata -> config.json ----------------------------------------------
    def hf_architecture(self) -> str:
        return self.architectures[0]

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        n_head = kv[f"{a}.attention.head_count"]
        d = kv[f"{a}.embedding_length"]
        cfg = {
            "architectures": [cls.architectures[0]],
            "model_type": cls.hf_model_type,
            "hidden_size": d,
            "intermediate_size": kv[f"{a}.feed_forward_length"],
            "num_hidden_layers": kv[f"{a}.block_count"],
            "num_attention_heads": n_head,
            "num_key_value_heads": kv.get(f"{a}.attention.head_count_kv", n_head),
            "max_position_embeddings": kv.get(f"{a}.context_length", 2048),
            "rms_norm_eps": kv.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": kv.get(f"{a}.rope.freq_base", 10000.0),
            "vocab_size": n_vocab,
            "tie_word_embeddings": tied,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if (kl := kv.get(f"{a}.attention.key_length")) is not None and kl != d // n_head:
            cfg["head_dim"] = kl
        return cfg
