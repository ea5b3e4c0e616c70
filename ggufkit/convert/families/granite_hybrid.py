"""Granite 4.0 hybrid (GraniteMoeHybridForCausalLM): Granite's attention (q/k rows permuted as
Llama's, scaling multipliers, no RoPE) in some layers (layer_types "attention"), Mamba-2 mixers in the
others, and in every layer either experts beside a shared MLP or the shared MLP alone as a dense FFN.
As llama.cpp's converter writes it: the fused gate/up projections (block_sparse_moe.input_linear,
shared_mlp.input_linear, gate rows first) split into ffn_gate/ffn_up; A written as A = -exp(A_log),
A and D as (heads, 1) columns, the gated norm as (groups, inner / groups), the convolution squeezed;
the tokenizer read as Mamba-2's converter reads it, its vocabulary padded to a multiple of 8."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ggufkit.convert.checkpoint import Checkpoint, expert_slice
from ggufkit.convert.families.base import MINUS_EXP_IS_LOSSY, Experts, Family, layer_index, minus_exp, register
from ggufkit.convert.families.granite import Granite
from ggufkit.convert.tokenizer import Vocab
from ggufkit.errors import GgufkitError

ATTENTION = ("attention", "full_attention")  # layer_types of attention layers: released configs', transformers'
MAMBA = ("mamba", "linear_attention")
PAD_VOCAB = 8  # llama.cpp's converter pads a hybrid's vocabulary to a multiple of this
CONTEXT = 2**20  # the context length it writes for a model without RoPE: any


@register("GraniteMoeHybridForCausalLM")
class GraniteHybrid(Granite):
    arch = gguf.MODEL_ARCH.GRANITE_HYBRID
    hf_model_type = "granitemoehybrid"
    reads_add_prefix_space = False
    llama3_rope_freqs = False

    def __init__(self, config: dict):
        super().__init__(config)
        c = self.config
        types = c.get("layer_types") or []
        if len(types) != self.n_layer or any(t not in ATTENTION + MAMBA for t in types):
            raise GgufkitError(f"GraniteMoeHybrid needs layer_types, one of {', '.join(ATTENTION + MAMBA)} per layer")
        self.mamba = [t in MAMBA for t in types]
        if not any(self.mamba):
            raise GgufkitError("GraniteMoeHybrid without Mamba layers (Granite 4.0 micro) is not supported: "
                               "llama.cpp's converter writes it as Granite")
        if c.get("mamba_proj_bias") or c.get("position_embedding_type") not in (None, "nope"):
            raise GgufkitError("GraniteMoeHybrid with Mamba projection biases or RoPE is not supported")
        if c.get("num_local_experts"):
            self.experts = Experts("block_sparse_moe", "w1", "w3", "w2", ff_key="intermediate_size",
                                   count_key="num_local_experts", router="router.layer")
        elif c["shared_intermediate_size"] != c["intermediate_size"]:
            raise GgufkitError("GraniteMoeHybrid without experts needs shared_intermediate_size = intermediate_size: "
                               "llama.cpp sizes the dense FFN by intermediate_size")
        self.inner = c["mamba_expand"] * c["hidden_size"]
        c["max_position_embeddings"] = CONTEXT

    @property
    def head_count_kv(self) -> list[int]:
        return [0 if mamba else self.config["num_key_value_heads"] for mamba in self.mamba]  # none in Mamba layers

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        c = self.config
        w.add_expert_shared_feed_forward_length(c["shared_intermediate_size"])  # also where it is the dense FFN
        w.add_ssm_conv_kernel(c["mamba_d_conv"])
        w.add_ssm_state_size(c["mamba_d_state"])
        w.add_ssm_group_count(c["mamba_n_groups"])
        w.add_ssm_inner_size(self.inner)
        w.add_ssm_time_step_rank(c["mamba_n_heads"])
        w.add_rope_scaling_finetuned(False)  # llama.cpp applies no RoPE

    def _attention_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        if not self.mamba[layer_index(p)]:
            return super()._attention_tensors(p)
        c = self.config
        d, heads, groups, state = c["hidden_size"], c["mamba_n_heads"], c["mamba_n_groups"], c["mamba_d_state"]
        channels = self.inner + 2 * groups * state  # x, B, C
        m = p + "mamba."
        out = {m + "in_proj.weight": (self.inner + channels + heads, d),  # z, x, B, C, dt
               m + "conv1d.weight": (channels, c["mamba_d_conv"])}
        if c.get("mamba_conv_bias", True):
            out[m + "conv1d.bias"] = (channels,)
        return {**out, m + "dt_bias": (heads,), m + "A_log": (heads, 1), m + "D": (heads, 1),
                m + "norm.weight": (groups, self.inner // groups), m + "out_proj.weight": (d, self.inner)}

    def _ffn_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        shared = self._mlp_tensors(p + self._shared_mlp(), self.config["shared_intermediate_size"])
        return {**super()._ffn_tensors(p), **shared} if self.experts is not None else shared

    def _shared_mlp(self) -> str:
        """The module name the shared MLP is presented under: llama.cpp's shared expert, or its FFN when alone."""
        return "mlp.shared_expert." if self.experts is not None else "mlp."

    def prepare(self, ckpt: Checkpoint) -> None:
        super().prepare(ckpt)
        c = self.config
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            if (shared := ckpt.tensors.pop(p + "shared_mlp.input_linear.weight", None)) is not None:
                split_gate_up(ckpt, shared, p + self._shared_mlp() + "{}.weight")
            if (down := ckpt.tensors.pop(p + "shared_mlp.output_linear.weight", None)) is not None:
                ckpt.tensors[p + self._shared_mlp() + "down_proj.weight"] = down
            x = p + "block_sparse_moe."
            fused = {x + "input_linear.weight", x + "output_linear.weight"}
            if self.experts is not None and fused <= ckpt.tensors.keys():
                gate_up = ckpt.tensors.pop(x + "input_linear.weight")
                down = ckpt.tensors.pop(x + "output_linear.weight")
                for e in range(gate_up.shape[0]):
                    split_gate_up(ckpt, expert_slice(gate_up, e), x + f"experts.{e}.{{}}.weight", ("w1", "w3"))
                    ckpt.tensors[x + f"experts.{e}.w2.weight"] = expert_slice(down, e)
            if not self.mamba[i]:
                continue
            m = p + "mamba."
            if m + "conv1d.weight" in ckpt.tensors:
                ckpt.squeeze(m + "conv1d.weight")
            heads, groups = c["mamba_n_heads"], c["mamba_n_groups"]
            columns = (("A_log", (heads, 1)), ("D", (heads, 1)), ("norm.weight", (groups, self.inner // groups)))
            for name, shape in columns:
                if (info := ckpt.tensors.get(m + name)) is not None and info.shape == (int(np.prod(shape)),):
                    ckpt.reshape(m + name, shape)  # what does not fit stays as it is, for plan() to name

    def transform(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        if hf_name.endswith(".A_log"):
            return minus_exp(x)
        return super().transform(hf_name, x)

    @property
    def tokenizer_size(self) -> int:
        return -(-self.config["vocab_size"] // PAD_VOCAB) * PAD_VOCAB

    def tokenizer_settings(self, root: Path, vocab: Vocab) -> None:
        Family.tokenizer_settings(self, root, vocab)  # Mamba-2's converter reads the tokenizer, not Llama's

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        raise GgufkitError(f"export-hf of {cls.architectures[0]} is not supported: {MINUS_EXP_IS_LOSSY}")


def split_gate_up(ckpt: Checkpoint, fused, pattern: str, names=("gate_proj", "up_proj")) -> None:
    """A fused (2 ff, d) gate/up projection, gate rows first, as two virtual tensors named by `pattern`."""
    ff, d = fused.shape[0] // 2, fused.shape[1]
    for name, rows in zip(names, (slice(0, ff), slice(ff, None))):
        ckpt.add_packed(pattern.format(name), (ff, d), {"w": fused}, lambda t, rows=rows: t["w"][rows], fused.dtype)
