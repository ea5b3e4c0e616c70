"""DeepSeek-V3: multi-head latent attention (queries through a low-rank q_a/q_b pair, keys and values
from one compressed latent, kv_a_proj_with_mqa, expanded per head by kv_b_proj), which llama.cpp runs
as multi-query attention over the latent: kv_b_proj is split into k_b (per head, latent x key
columns, transposed) and v_b, as its converter splits it (export-hf joins them back). Then a dense
FFN in the first first_k_dense_replace layers and, in the others, sigmoid-scored experts chosen within
groups (with a per-expert score bias, e_score_correction_bias) beside shared experts. Rotary
dimensions interleaved as llama.cpp's (no q/k permutation); the multi-token-prediction layers past
num_hidden_layers are left out, as llama.cpp's converter leaves them."""

from __future__ import annotations

import gguf
import numpy as np

from ggufkit.convert.checkpoint import Checkpoint
from ggufkit.convert.families.base import (GATING_FUNCS, Experts, Family, layer_index, register,
                                           rope_parameters_from_gguf)


@register("DeepseekV3ForCausalLM")
class DeepseekV3(Family):
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    hf_model_type = "deepseek_v3"
    experts = Experts("mlp", "gate_proj", "up_proj", "down_proj", ff_key="moe_intermediate_size",
                      count_key="n_routed_experts")
    tokenizers = ("bpe",)

    def __init__(self, config: dict):
        super().__init__({"rms_norm_eps": 1e-6, **config})
        self.n_dense = self.config.get("first_k_dense_replace") or 0

    @property
    def n_expert(self) -> int | None:
        return self.config["n_routed_experts"]

    @property
    def head_count_kv(self) -> int:
        return 1  # llama.cpp runs the latent as one key/value head

    @property
    def attention_lengths(self) -> tuple[int, int]:
        latent = self.config["kv_lora_rank"]
        return latent + self.config["qk_rope_head_dim"], latent  # keys: the latent and the RoPE part

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        c = self.config
        latent, rope = c["kv_lora_rank"], c["qk_rope_head_dim"]
        w.add_leading_dense_block_count(self.n_dense)
        w.add_vocab_size(c["vocab_size"])
        if c.get("q_lora_rank") is not None:
            w.add_q_lora_rank(c["q_lora_rank"])
        w.add_kv_lora_rank(latent)
        w.add_key_length_mla(c["qk_nope_head_dim"] + rope)
        w.add_value_length_mla(c["v_head_dim"])
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        w.add_expert_shared_count(c.get("n_shared_experts") or 0)
        if c.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(c["routed_scaling_factor"])
        if c.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(rope)
        if (mscale_all_dim := self.rope.get("mscale_all_dim")) is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)  # llama.cpp's DeepSeek convention

    def _attention_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        d, h, latent = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
        nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        a = p + "self_attn."
        if (q_rank := c.get("q_lora_rank")) is not None:
            out = {a + "q_a_proj.weight": (q_rank, d), a + "q_a_layernorm.weight": (q_rank,),
                   a + "q_b_proj.weight": (h * (nope + rope), q_rank)}
        else:
            out = {a + "q_proj.weight": (h * (nope + rope), d)}
        return {**out, a + "kv_a_proj_with_mqa.weight": (latent + rope, d), a + "kv_a_layernorm.weight": (latent,),
                a + "k_b_proj.weight": (h, latent, nope), a + "v_b_proj.weight": (h, v, latent),
                a + "o_proj.weight": (d, h * v)}

    def _ffn_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        if layer_index(p) < self.n_dense:
            return self._mlp_tensors(p + "mlp.", c["intermediate_size"])
        out = {**self._expert_tensors(p), p + "mlp.gate.e_score_correction_bias": (self.n_expert,)}
        if n_shared := c.get("n_shared_experts"):
            out.update(self._mlp_tensors(p + "mlp.shared_experts.", c["moe_intermediate_size"] * n_shared))
        return out

    def ignored(self, hf_name: str) -> bool:
        layer = layer_index(hf_name)
        return super().ignored(hf_name) or (layer is not None and layer >= self.n_layer)

    def gguf_name(self, hf_name: str) -> str | None:
        return super().gguf_name(hf_name.replace("e_score_correction_bias", "e_score_correction.bias"))

    def prepare(self, ckpt: Checkpoint) -> None:
        super().prepare(ckpt)
        c = self.config
        latent, nope, h = c["kv_lora_rank"], c["qk_nope_head_dim"], c["num_attention_heads"]

        def heads(t: dict) -> np.ndarray:  # kv_b_proj as (heads, key columns then value rows, latent)
            return t["w"].reshape(h, -1, latent)

        for i in range(self.n_layer):
            a = f"model.layers.{i}.self_attn."
            if (kv_b := ckpt.tensors.pop(a + "kv_b_proj.weight", None)) is None:
                continue  # plan() names what is missing
            ckpt.add_packed(a + "k_b_proj.weight", (h, latent, nope), {"w": kv_b},
                            lambda t: np.ascontiguousarray(heads(t)[:, :nope].transpose(0, 2, 1)), kv_b.dtype)
            ckpt.add_packed(a + "v_b_proj.weight", (h, c["v_head_dim"], latent), {"w": kv_b},
                            lambda t: np.ascontiguousarray(heads(t)[:, nope:]), kv_b.dtype)

    def fused_tensors(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        c = self.config
        rows = c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["v_head_dim"])
        return {f"model.layers.{i}.self_attn.kv_b_proj.weight":
                ((f"model.layers.{i}.self_attn.k_b_proj.weight", f"model.layers.{i}.self_attn.v_b_proj.weight"),
                 (rows, c["kv_lora_rank"])) for i in range(self.n_layer)}

    def join(self, name: str, parts: list[np.ndarray]) -> np.ndarray:
        if name.endswith("kv_b_proj.weight"):  # the inverse of prepare's split
            k_b, v_b = parts
            return np.concatenate((k_b.transpose(0, 2, 1), v_b), axis=1).reshape(-1, k_b.shape[1])
        return super().join(name, parts)

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        for key in ("rope_theta", "head_dim"):  # head_dim: MLA's, transformers' is the RoPE part's
            cfg.pop(key, None)
        rope = rope_parameters_from_gguf(kv, a)
        if (log_mul := kv.get(f"{a}.rope.scaling.yarn_log_multiplier")) is not None:
            # llama.cpp's convention, mscale equal to mscale_all_dim; divided in float32, as it was written
            rope["mscale"] = rope["mscale_all_dim"] = float(np.float32(log_mul) / np.float32(0.1))
        rot = kv[f"{a}.rope.dimension_count"]
        scoring = {v: k for k, v in GATING_FUNCS.items()}[kv.get(f"{a}.expert_gating_func", GATING_FUNCS["softmax"])]
        cfg.update(num_key_value_heads=cfg["num_attention_heads"], rope_parameters=rope, rope_interleave=True,
                   q_lora_rank=kv.get(f"{a}.attention.q_lora_rank"), kv_lora_rank=kv[f"{a}.attention.kv_lora_rank"],
                   qk_nope_head_dim=kv[f"{a}.attention.key_length_mla"] - rot, qk_rope_head_dim=rot,
                   v_head_dim=kv[f"{a}.attention.value_length_mla"],
                   first_k_dense_replace=kv[f"{a}.leading_dense_block_count"],
                   moe_intermediate_size=kv[f"{a}.expert_feed_forward_length"],
                   n_shared_experts=kv.get(f"{a}.expert_shared_count", 0),
                   routed_scaling_factor=kv.get(f"{a}.expert_weights_scale", 1.0),
                   norm_topk_prob=bool(kv.get(f"{a}.expert_weights_norm", False)),
                   n_group=kv.get(f"{a}.expert_group_count", 1), topk_group=kv.get(f"{a}.expert_group_used_count", 1),
                   scoring_func=scoring, topk_method="noaux_tc", num_nextn_predict_layers=0)
        return cfg
