"""Qwen3-Next: three in four layers are gated DeltaNet linear attention (layer_types
"linear_attention"), the others gated full attention (q_proj twice the heads: queries and their
output gates; NeoX RoPE on a quarter of each head), and every layer a mixture of experts beside a
gated shared expert. As llama.cpp's converter writes it: in_proj_qkvz, stored per key head as
[q, k, v, z], split into attn_qkv (all q, all k, all v) and attn_gate (z); the conv1d weight
squeezed to (channels, kernel); A_log written as A = -exp(A_log); (1 + w) norms shifted by one
except the DeltaNet output norm. The multi-token-prediction layer (mtp.*) becomes one more block
with llama.cpp's nextn tensors."""

from __future__ import annotations

import re

import gguf
import numpy as np

from ggufkit.convert.checkpoint import Checkpoint
from ggufkit.convert.families.base import MINUS_EXP_IS_LOSSY, Experts, Family, layer_index, minus_exp, register
from ggufkit.errors import GgufkitError

# the multi-token-prediction module's own tensors -> their names in its block, as llama.cpp's converter maps them
MTP_NAMES = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
             "norm": "shared_head.norm"}
NEXTN = {"eh_proj": gguf.MODEL_TENSOR.NEXTN_EH_PROJ, "enorm": gguf.MODEL_TENSOR.NEXTN_ENORM,
         "hnorm": gguf.MODEL_TENSOR.NEXTN_HNORM, "shared_head.norm": gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM}
MTP_LAYER = re.compile(r"^(?:model\.)?mtp\.layers\.(\d+)\.(.*)$")
MTP_OWN = re.compile(r"^(?:model\.)?mtp\.([a-z_]+)\.weight$")
# in_proj_qkvz's halves, as virtual tensors -> llama.cpp's
SPLIT_QKVZ = {"in_proj_qkv": gguf.MODEL_TENSOR.ATTN_QKV, "in_proj_z": gguf.MODEL_TENSOR.ATTN_GATE}


def split_qkvz(w: np.ndarray, n_key_heads: int, sizes: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """in_proj_qkvz's rows, [q, k, v, z] for each key head -> (all q, all k, all v rows), all z rows."""
    cols = w.shape[-1]
    h = w.reshape(n_key_heads, -1, cols)
    q, k, v = np.cumsum(sizes)
    qkv = np.concatenate([part.reshape(-1, cols) for part in (h[:, :q], h[:, q:k], h[:, k:v])])
    return qkv, h[:, v:].reshape(-1, cols)


@register("Qwen3NextForCausalLM")
class Qwen3Next(Family):
    arch = gguf.MODEL_ARCH.QWEN3NEXT
    hf_model_type = "qwen3_next"
    qk_norm = "head"
    experts = Experts("mlp", "gate_proj", "up_proj", "down_proj", ff_key="moe_intermediate_size")
    tokenizers = ("bpe",)

    def __init__(self, config: dict):
        super().__init__(config)
        c = self.config
        if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
            raise GgufkitError("Qwen3-Next with dense layers (mlp_only_layers, decoder_sparse_step) is not "
                               "supported: llama.cpp runs experts in every layer")
        self.linear = [t == "linear_attention" for t in c["layer_types"]]

    @property
    def n_mtp(self) -> int:
        return self.n_block - self.n_layer

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        c = self.config
        if self.experts is not None:
            w.add_expert_feed_forward_length(c["moe_intermediate_size"])
            w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
        if self.n_mtp:
            w.add_nextn_predict_layers(self.n_mtp)
        w.add_ssm_conv_kernel(c["linear_conv_kernel_dim"])
        w.add_ssm_state_size(c["linear_key_head_dim"])
        w.add_ssm_group_count(c["linear_num_key_heads"])
        w.add_ssm_time_step_rank(c["linear_num_value_heads"])
        w.add_ssm_inner_size(c["linear_value_head_dim"] * c["linear_num_value_heads"])
        # gguf's writer on PyPI has no add_recurrent_layers yet
        w.add_array(f"{self.arch_name()}.attention.recurrent_layers", self.linear + [False] * self.n_mtp)
        w.add_full_attention_interval(c.get("full_attention_interval", 4))
        w.add_rope_dimension_count(int(self.head_dim * self.rope.get("partial_rotary_factor", 0.25)))

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        out = super().expected_tensors()
        d = self.config["hidden_size"]
        for i in range(self.n_layer, self.n_block):
            p = f"model.layers.{i}."
            out.update({p + "eh_proj.weight": (d, 2 * d), p + "enorm.weight": (d,), p + "hnorm.weight": (d,),
                        p + "shared_head.norm.weight": (d,)})
        return out

    def _attention_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        if not self._is_linear(p):
            out = super()._attention_tensors(p)
            out[p + "self_attn.q_proj.weight"] = (2 * c["num_attention_heads"] * self.head_dim, c["hidden_size"])
            return out  # queries and their output gates
        d, nv, hv = c["hidden_size"], c["linear_num_value_heads"], c["linear_value_head_dim"]
        qkv = 2 * c["linear_num_key_heads"] * c["linear_key_head_dim"] + nv * hv
        a = p + "linear_attn."
        return {a + "in_proj_qkv.weight": (qkv, d), a + "in_proj_z.weight": (nv * hv, d),
                a + "in_proj_ba.weight": (2 * nv, d), a + "conv1d.weight": (qkv, c["linear_conv_kernel_dim"]),
                a + "A_log": (nv,), a + "dt_bias": (nv,), a + "norm.weight": (hv,), a + "out_proj.weight": (d, nv * hv)}

    def _ffn_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        if self.experts is None:  # Qwen3.5's dense FFN
            return super()._ffn_tensors(p)
        m = p + "mlp."
        return {**super()._ffn_tensors(p), m + "shared_expert_gate.weight": (1, c["hidden_size"]),
                **self._mlp_tensors(m + "shared_expert.", c["shared_expert_intermediate_size"])}

    def _is_linear(self, p: str) -> bool:
        i = layer_index(p)
        return i < self.n_layer and self.linear[i]

    def gguf_name(self, hf_name: str) -> str | None:
        i = layer_index(hf_name)
        tail = hf_name.removeprefix(f"model.layers.{i}.")
        if tail.removesuffix(".weight") in NEXTN:
            return gguf.TENSOR_NAMES[NEXTN[tail.removesuffix(".weight")]].format(bid=i) + ".weight"
        if (half := tail.removeprefix("linear_attn.").removesuffix(".weight")) in SPLIT_QKVZ:
            return gguf.TENSOR_NAMES[SPLIT_QKVZ[half]].format(bid=i) + ".weight"
        return super().gguf_name(hf_name)

    def transform(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        if hf_name.endswith(".A_log"):
            return minus_exp(x)
        if hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
            return x + np.float32(1.0)
        return x

    def prepare(self, ckpt: Checkpoint) -> None:
        super().prepare(ckpt)
        ckpt.rename(self._mtp_name)
        self.n_block = 1 + max(self.n_layer - 1, *(i for n in ckpt.tensors if (i := layer_index(n)) is not None))
        self.name_map = gguf.get_tensor_name_map(self.arch, self.n_block)
        c = self.config
        nk, hk = c["linear_num_key_heads"], c["linear_key_head_dim"]
        sizes = (hk, hk, c["linear_num_value_heads"] // nk * c["linear_value_head_dim"])  # q, k, v per key head
        for i in [i for i, linear in enumerate(self.linear) if linear]:
            a = f"model.layers.{i}.linear_attn."
            if (qkvz := ckpt.tensors.pop(a + "in_proj_qkvz.weight", None)) is not None:
                rows, d = qkvz.shape
                ckpt.add_packed(a + "in_proj_qkv.weight", (nk * sum(sizes), d), {"w": qkvz},
                                lambda t: split_qkvz(t["w"], nk, sizes)[0], qkvz.dtype)
                ckpt.add_packed(a + "in_proj_z.weight", (rows - nk * sum(sizes), d), {"w": qkvz},
                                lambda t: split_qkvz(t["w"], nk, sizes)[1], qkvz.dtype)
            if a + "conv1d.weight" in ckpt.tensors:
                ckpt.squeeze(a + "conv1d.weight")

    def _mtp_name(self, name: str) -> str:
        """mtp.layers.<j>.* -> model.layers.<n_layer + j>.*, and the module's own tensors into its block."""
        if m := MTP_LAYER.match(name):
            return f"model.layers.{self.n_layer + int(m[1])}.{m[2]}"
        if (m := MTP_OWN.match(name)) and m[1] in MTP_NAMES:
            return f"model.layers.{self.n_layer}.{MTP_NAMES[m[1]]}.weight"
        return name

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        raise GgufkitError(f"export-hf of {cls.architectures[0]} is not supported: {MINUS_EXP_IS_LOSSY}")
