"""GPT-OSS: attention with q/k/v/o biases, per-head sinks and a sliding window on every other layer,
and a mixture-of-experts FFN with biases (router mlp.router). Its checkpoints fuse each layer's
experts: gate_up_proj (experts x d x 2ff, gate and up interleaved column by column) and down_proj
(experts x ff x d), in floats, or, in the released ones, in MXFP4 (`<name>_blocks`/`<name>_scales`,
rows = outputs), which llama.cpp's converter writes as MXFP4 byte for byte. Both are split here
into one virtual tensor per expert and projection, read one expert at a time; export-hf fuses them
back, in floats (`fused_tensors`, `join`)."""

from __future__ import annotations

import gguf
import numpy as np

from ggufkit.convert.checkpoint import Checkpoint, expert_slice
from ggufkit.convert.families.base import Experts, Family, register, rope_parameters_from_gguf
from ggufkit.convert.packed import mxfp4_to_ggml
from ggufkit.errors import GgufkitError
from ggufkit.kquants import dequantize

MXFP4 = gguf.GGMLQuantizationType.MXFP4
# (projection, the rows of gate_up_proj's output it takes): gate the even ones, up the odd ones
GATE_UP = (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2)))


def _mxfp4_bytes(parts: dict) -> np.ndarray:
    return mxfp4_to_ggml(parts["blocks"], parts["scales"])


def _mxfp4_values(parts: dict) -> np.ndarray:
    data = _mxfp4_bytes(parts)
    return dequantize(data.reshape(-1, data.shape[-1]), MXFP4).reshape(data.shape[0], -1)


@register("GptOssForCausalLM")
class GptOss(Family):
    arch = gguf.MODEL_ARCH.GPT_OSS
    hf_model_type = "gpt_oss"
    attention_bias = True
    experts = Experts("mlp", "gate_proj", "up_proj", "down_proj", ff_key="intermediate_size",
                      count_key="num_local_experts", router="router")
    tokenizers = ("bpe",)
    export_head_dim = True

    def __init__(self, config: dict):
        super().__init__(config)
        alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.n_layer)]
        if self.config.get("layer_types", alternating) != alternating:
            raise GgufkitError("GPT-OSS with layer_types other than sliding and full attention alternating "
                               "(sliding first) is not supported: llama.cpp alternates them so")

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_sliding_window(self.config["sliding_window"])
        w.add_expert_feed_forward_length(self.config["intermediate_size"])

    def _attention_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        a = p + "self_attn."
        return {**super()._attention_tensors(p), a + "o_proj.bias": (c["hidden_size"],),
                a + "sinks": (c["num_attention_heads"],)}

    def _ffn_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        d, ff, n = c["hidden_size"], c["intermediate_size"], self.n_expert
        x = p + "mlp.experts."
        return {**super()._ffn_tensors(p), p + "mlp.router.bias": (n,), x + "gate_proj.bias": (n, ff),
                x + "up_proj.bias": (n, ff), x + "down_proj.bias": (n, d)}

    def gguf_name(self, hf_name: str) -> str | None:
        # llama.cpp's converter names the sinks as a weight
        return super().gguf_name(hf_name + ".weight" if hf_name.endswith(".sinks") else hf_name)

    def prepare(self, ckpt: Checkpoint) -> None:
        super().prepare(ckpt)
        for i in range(self.n_layer):
            x = f"model.layers.{i}.mlp.experts."
            has = lambda *names: all(x + name in ckpt.tensors for name in names)  # noqa: E731
            # what a layer lacks stays as it is, for plan() to name
            if has("gate_up_proj_bias", "down_proj_bias"):
                self._split_biases(ckpt, x)
            if has("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
                self._split_mxfp4(ckpt, x)
            elif has("gate_up_proj", "down_proj"):
                self._split_floats(ckpt, x)

    @staticmethod
    def _split_biases(ckpt: Checkpoint, x: str) -> None:
        gate_up, down = ckpt.tensors.pop(x + "gate_up_proj_bias"), ckpt.tensors.pop(x + "down_proj_bias")
        n, ff = gate_up.shape[0], gate_up.shape[1] // 2
        for proj, r in GATE_UP:
            ckpt.add_packed(f"{x}{proj}.bias", (n, ff), {"b": gate_up}, lambda t, r=r: t["b"][:, r], gate_up.dtype)
        ckpt.add_packed(x + "down_proj.bias", down.shape, {"b": down}, lambda t: t["b"], down.dtype)

    @staticmethod
    def _split_mxfp4(ckpt: Checkpoint, x: str) -> None:
        for fused, projs in (("gate_up_proj", GATE_UP), ("down_proj", (("down_proj", slice(None)),))):
            blocks, scales = ckpt.tensors.pop(f"{x}{fused}_blocks"), ckpt.tensors.pop(f"{x}{fused}_scales")
            n, rows, groups, _ = blocks.shape
            for e in range(n):
                parts = {"blocks": expert_slice(blocks, e), "scales": expert_slice(scales, e)}
                for proj, r in projs:
                    shape = (len(range(rows)[r]), groups * 32)
                    ckpt.add_packed(f"{x}{e}.{proj}.weight", shape, parts, lambda t, r=r: _mxfp4_values(t)[r],
                                    stored=(MXFP4, lambda t, r=r: _mxfp4_bytes(t)[r]))

    @staticmethod
    def _split_floats(ckpt: Checkpoint, x: str) -> None:
        gate_up, down = ckpt.tensors.pop(x + "gate_up_proj"), ckpt.tensors.pop(x + "down_proj")
        n, ff, d = down.shape
        for e in range(n):
            for proj, r in GATE_UP:
                ckpt.add_packed(f"{x}{e}.{proj}.weight", (ff, d), {"w": expert_slice(gate_up, e)},
                                lambda t, r=r: np.ascontiguousarray(t["w"][:, r].T), gate_up.dtype)
            ckpt.add_packed(f"{x}{e}.down_proj.weight", (d, ff), {"w": expert_slice(down, e)},
                            lambda t: np.ascontiguousarray(t["w"].T), down.dtype)

    def fused_tensors(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        c = self.config
        d, ff, n = c["hidden_size"], c["intermediate_size"], self.n_expert
        out = {}
        for i in range(self.n_layer):
            x = f"model.layers.{i}.mlp.experts."
            per_expert = lambda proj: tuple(f"{x}{e}.{proj}.weight" for e in range(n))  # noqa: E731
            out.update({x + "gate_up_proj": (per_expert("gate_proj") + per_expert("up_proj"), (n, d, 2 * ff)),
                        x + "down_proj": (per_expert("down_proj"), (n, ff, d)),
                        x + "gate_up_proj_bias": ((x + "gate_proj.bias", x + "up_proj.bias"), (n, 2 * ff)),
                        x + "down_proj_bias": ((x + "down_proj.bias",), (n, d))})
        return out

    def join(self, name: str, parts: list[np.ndarray]) -> np.ndarray:
        # the inverse of _split_floats and _split_biases: transformers keeps the weights as inputs x outputs
        if name.endswith("gate_up_proj_bias"):
            return _interleave(*parts)
        if name.endswith("gate_up_proj"):
            n = len(parts) // 2
            return _interleave(np.stack(parts[:n]).swapaxes(1, 2), np.stack(parts[n:]).swapaxes(1, 2))
        if name.endswith("experts.down_proj"):
            return np.stack(parts).swapaxes(1, 2)
        return super().join(name, parts)

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        a = cls.arch_name()
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        del cfg["rope_theta"]
        rope = rope_parameters_from_gguf(kv, a)
        if rope["rope_type"] == "yarn":
            rope["truncate"] = True  # llama.cpp rounds YaRN's correction range
        cfg.update(intermediate_size=kv[f"{a}.expert_feed_forward_length"], attention_bias=True, rope_parameters=rope,
                   sliding_window=kv[f"{a}.attention.sliding_window"],
                   layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(cfg["num_hidden_layers"])])
        return cfg


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate_up_proj's last axis: gate's columns at the even places, up's at the odd ones (GATE_UP)."""
    return np.stack((gate, up), axis=-1).reshape(*gate.shape[:-1], -1)
