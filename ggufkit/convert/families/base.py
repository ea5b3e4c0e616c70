"""What every decoder-only family shares: the HF config -> GGUF hyper-parameters that llama.cpp's
converter writes for all text models, the tensor name map (from gguf), the llama-style tensor list
used to check a checkpoint against its config (with the variations families declare: fused q/k/v or
gate/up projections, q/k norms, extra norms, mixture-of-experts layers), how per-expert tensors
merge into llama.cpp's 3-D ffn_*_exps tensors, Llama 3.1's RoPE scaling as a rope_freqs tensor, the
text model of image-text checkpoints, and which tokenizer files a family reads. Families override
only what differs; one whose checkpoints store tensors otherwise than llama.cpp takes them (fused
experts, a fused key/value projection, MXFP4 blocks) presents them as virtual tensors in `prepare`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np

from ggufkit.convert.checkpoint import Checkpoint
from ggufkit.convert.tokenizer import Vocab, load_vocab, tokenizer_config
from ggufkit.errors import GgufkitError

FAMILIES: dict[str, type["Family"]] = {}


def register(*architectures: str):
    def wrap(cls):
        cls.architectures = architectures
        for a in architectures:
            FAMILIES[a] = cls
        return cls
    return wrap


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts layer as the checkpoint stores it: a router `<module>.<router>.weight` and one
    tensor per expert and projection, `<module>.experts.<e>.<proj>.weight` (or a family's split of its
    fused ones, see `Family.prepare`), which llama.cpp stacks into one 3-D tensor per projection
    (experts x rows x cols: ffn_gate_exps, ffn_up_exps, ffn_down_exps)."""
    module: str  # "mlp" (Qwen3-MoE), "block_sparse_moe" (Mixtral)
    gate: str  # the per-expert projection names
    up: str
    down: str
    ff_key: str  # the config key of one expert's hidden size
    count_key: str = "num_experts"  # the config key of the number of experts (Mixtral: num_local_experts)
    router: str = "gate"


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's 'llama3' rope scaling (what llama.cpp reads as rope_freqs),
    in float32 step by step as llama.cpp's converter computes them in torch, so the bytes match: torch
    divides a number by a tensor as the tensor's reciprocal times the number, and its float32 powers
    are float64 ones rounded (numpy's float32 ones are an ulp off for most bases and head sizes; torch's
    own can be too, rarely)."""
    f32 = np.float32
    base = rope.get("rope_theta", 10000.0)
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    freqs = f32(1) / (base ** exponents.astype(np.float64)).astype(f32)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = f32(1) / freqs * f32(2 * math.pi)
    smooth = (f32(1) / wavelen * f32(old_ctx) - f32(low)) / f32(high - low)
    mid = f32(1) / ((f32(1) - smooth) / f32(factor) + smooth)
    return np.where(wavelen < old_ctx / high, f32(1), np.where(wavelen > old_ctx / low, f32(factor), mid)).astype(f32)


def rope_parameters_from_gguf(kv: dict, arch: str) -> dict:
    """config.json's rope_parameters from the GGUF's RoPE base and YaRN scaling (for export-hf)."""
    rope = {"rope_type": "default", "rope_theta": kv.get(f"{arch}.rope.freq_base", 10000.0)}
    if kv.get(f"{arch}.rope.scaling.type") == "yarn":
        rope.update(rope_type="yarn", factor=kv[f"{arch}.rope.scaling.factor"],
                    original_max_position_embeddings=kv[f"{arch}.rope.scaling.original_context_length"],
                    beta_fast=kv.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0),
                    beta_slow=kv.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0))
    return rope


def minus_exp(a_log: np.ndarray) -> np.ndarray:
    """A state-space layer's A = -exp(A_log), as llama.cpp takes it: exp in float64, rounded once (llama.cpp's
    converter's float32 exp, torch's, is one ulp off in about 1% of values)."""
    return (-np.exp(a_log.astype(np.float64))).astype(np.float32)


# why export-hf refuses the families that write minus_exp
MINUS_EXP_IS_LOSSY = "A = -exp(A_log) has no exact inverse in float32 (neighbouring A_log values round to one A)"


# config.json's scoring_func -> how llama.cpp weighs the chosen experts
GATING_FUNCS = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a checkpoint tensor (or a `model.layers.<i>.` prefix) belongs to."""
    m = LAYER.match(name)
    return None if m is None else int(m[1])


EXPERT = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<e>\d+)\.(?P<proj>[^.]+)\.weight$")


class Family:
    architectures: tuple[str, ...] = ()
    arch: gguf.MODEL_ARCH
    hf_model_type: str  # config.json's model_type, for export-hf
    attention_bias = False  # q/k/v biases (Qwen2)
    qk_norm: str | None = None  # q/k RMS norms: "head" per head (Qwen3, Gemma 3), "full" over all heads (OLMo 2)
    fused_qkv = False  # one qkv_proj (Phi-3), as llama.cpp keeps it (attn_qkv)
    fused_gate_up = False  # one gate_up_proj (Phi-3), as llama.cpp keeps it (ffn_up, twice the rows)
    # the per-layer norms, in the checkpoint's names (Gemma's sandwich adds pre/post-FFN norms)
    layer_norms = ("input_layernorm", "post_attention_layernorm")
    output_norm = "model.norm.weight"  # the norm before the output (LFM2: model.embedding_norm.weight)
    experts: Experts | None = None  # mixture-of-experts layers (Qwen3-MoE, Mixtral)
    llama3_rope_freqs = False  # 'llama3' RoPE scaling written as a rope_freqs tensor (Llama's family, EXAONE 4)
    # tokenizer files the family reads, in llama.cpp's converter's order of preference
    tokenizers = ("sentencepiece", "bpe")
    reads_add_prefix_space = False  # tokenizer_config.json's add_prefix_space as the space prefix (Llama, ERNIE)

    def __init__(self, config: dict):
        # Multimodal wrappers keep the language model's settings under text_config.
        self.config = {**config, **config.get("text_config", {})}
        self.n_layer = self.config["num_hidden_layers"]
        self.n_block = self.n_layer  # the GGUF's blocks: the decoder layers, then any multi-token-prediction ones
        self.name_map = gguf.get_tensor_name_map(self.arch, self.n_block)

    @classmethod
    def arch_name(cls) -> str:
        return gguf.MODEL_ARCH_NAMES[cls.arch]

    @classmethod
    def reads_gguf(cls, kv: dict) -> bool:
        """Whether this family exports a GGUF of its architecture (several families can share one:
        Llama and Mixtral)."""
        return True

    def config_value(self, *keys: str, default=None):
        """The first of `keys` the config sets (llama.cpp's converter's find_hparam)."""
        return next((self.config[k] for k in keys if self.config.get(k) is not None), default)

    # --- hyper-parameters -------------------------------------------------------------------
    @property
    def rope(self) -> dict:
        """The RoPE parameters, with the settings older configs keep at the top level mirrored in
        (as llama.cpp's converter reads them)."""
        c = self.config
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope = rope.get("full_attention", rope)
        for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
            if key not in rope and key in c:
                rope[key] = c[key]
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
        w.add_block_count(self.n_block)
        if "max_position_embeddings" in c:
            w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        if c.get("intermediate_size") is not None:  # mixture-of-experts configs can lack it (Qwen3.5-MoE)
            w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(c["num_attention_heads"])
        if (n_head_kv := self.head_count_kv) is not None:
            w.add_head_count_kv(n_head_kv)
        rope = self.rope
        if rope.get("rope_type") == "linear" and rope.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope.get("rope_type") == "yarn" and rope.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            attn_factor = rope.get("attention_factor", rope.get("attn_factor"))
            for value, add in ((rope.get("extrapolation_factor"), w.add_rope_scaling_yarn_ext_factor),
                               (attn_factor, w.add_rope_scaling_yarn_attn_factor),
                               (rope.get("beta_fast"), w.add_rope_scaling_yarn_beta_fast),
                               (rope.get("beta_slow"), w.add_rope_scaling_yarn_beta_slow)):
                if value is not None:
                    add(value)
        if rope.get("rope_theta") is not None:
            w.add_rope_freq_base(rope["rope_theta"])
        if (swa_theta := self.swa_rope_theta) is not None:
            w.add_rope_freq_base_swa(swa_theta)
        if "rms_norm_eps" in c:
            w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        if (eps := self.config_value("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
            w.add_layer_norm_eps(eps)
        if (n_expert := self.n_expert) is not None:
            w.add_expert_count(n_expert)
        if (n_used := self.config_value("num_experts_per_tok", "num_experts_per_token")) is not None:
            w.add_expert_used_count(n_used)
        if (n_groups := c.get("n_group")) is not None:  # group-limited routing (DeepSeek-V3)
            w.add_expert_group_count(n_groups)
        if (n_groups_used := c.get("topk_group")) is not None:
            w.add_expert_group_used_count(n_groups_used)
        if (scoring := c.get("scoring_func")) is not None:
            if scoring not in GATING_FUNCS:
                raise GgufkitError(f"unsupported scoring_func {scoring!r}; supported: {', '.join(GATING_FUNCS)}")
            w.add_expert_gating_func(GATING_FUNCS[scoring])
        if (lengths := self.attention_lengths) is not None:
            w.add_key_length(lengths[0])
            w.add_value_length(lengths[1])

    @property
    def head_count_kv(self) -> int | list[int] | None:
        """The key/value heads llama.cpp is told of (per layer where they differ)."""
        return self.config.get("num_key_value_heads")

    @property
    def attention_lengths(self) -> tuple[int, int] | None:
        """The key and value head sizes llama.cpp is told of, where the config gives them."""
        head_dim = self.config.get("head_dim")
        return None if head_dim is None else (head_dim, head_dim)

    @property
    def n_expert(self) -> int | None:
        return self.config_value("num_local_experts", "num_experts")

    # --- tensors ----------------------------------------------------------------------------
    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape the config implies, in the order they are written."""
        c = self.config
        d = c["hidden_size"]
        out = {"model.embed_tokens.weight": (c["vocab_size"], d)}
        for i in range(self.n_block):
            p = f"model.layers.{i}."
            out.update(self._attention_tensors(p))
            out.update({p + norm + ".weight": (d,) for norm in self.layer_norms})
            out.update(self._ffn_tensors(p))
        out[self.output_norm] = (d,)
        if not c.get("tie_word_embeddings", False):
            out["lm_head.weight"] = (c["vocab_size"], d)
        return out

    def _attention_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        c = self.config
        d, hd = c["hidden_size"], self.head_dim
        nq, nkv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        a = p + "self_attn."
        if self.fused_qkv:
            out = {a + "qkv_proj.weight": ((nq + 2 * nkv) * hd, d)}
        else:
            out = {a + "q_proj.weight": (nq * hd, d), a + "k_proj.weight": (nkv * hd, d),
                   a + "v_proj.weight": (nkv * hd, d)}
        if self.attention_bias:
            out.update({a + "q_proj.bias": (nq * hd,), a + "k_proj.bias": (nkv * hd,), a + "v_proj.bias": (nkv * hd,)})
        if self.qk_norm:
            per_head = self.qk_norm == "head"
            out.update({a + "q_norm.weight": (hd if per_head else nq * hd,),
                        a + "k_norm.weight": (hd if per_head else nkv * hd,)})
        out[a + "o_proj.weight"] = (d, nq * hd)
        return out

    def _ffn_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        if self.experts is not None:
            return self._expert_tensors(p)
        return self._mlp_tensors(p + "mlp.", self.config["intermediate_size"])

    def _expert_tensors(self, p: str) -> dict[str, tuple[int, ...]]:
        x, d = self.experts, self.config["hidden_size"]
        ff, m = self.config[x.ff_key], p + x.module
        out = {f"{m}.{x.router}.weight": (self.n_expert, d)}
        for e in range(self.n_expert):
            out.update({f"{m}.experts.{e}.{x.gate}.weight": (ff, d), f"{m}.experts.{e}.{x.up}.weight": (ff, d),
                        f"{m}.experts.{e}.{x.down}.weight": (d, ff)})
        return out

    def _mlp_tensors(self, m: str, ff: int) -> dict[str, tuple[int, ...]]:
        """A gated MLP under the module prefix `m` (a layer's mlp., DeepSeek's shared experts)."""
        d = self.config["hidden_size"]
        if self.fused_gate_up:
            return {m + "gate_up_proj.weight": (2 * ff, d), m + "down_proj.weight": (d, ff)}
        return {m + "gate_proj.weight": (ff, d), m + "up_proj.weight": (ff, d), m + "down_proj.weight": (d, ff)}

    def layout(self, hf_names: Iterable[str]) -> list[tuple[str, tuple[str, ...]]]:
        """The GGUF tensors made from these checkpoint tensors, in order: (GGUF name, its sources).
        One source each, except experts' tensors: all experts of a projection, stacked in expert
        order into one 3-D tensor (as llama.cpp's converter merges them); None names a tensor
        that cannot be mapped."""
        groups: dict[str, list[tuple[int, str]]] = {}
        for name in hf_names:
            m = EXPERT.match(name) if self.experts is not None else None
            key = f"{m['prefix']}{m['proj']}.weight" if m else name
            groups.setdefault(key, []).append((int(m["e"]) if m else 0, name))
        return [(self.gguf_name(key), tuple(n for _, n in sorted(members))) for key, members in groups.items()]

    def prepare(self, ckpt: Checkpoint) -> None:
        """Present the checkpoint's tensors as `expected_tensors` names them: the language model's
        (`checkpoint_name`); families whose checkpoints fuse tensors split them here."""
        ckpt.rename(self.checkpoint_name)

    def checkpoint_name(self, name: str) -> str | None:
        """The language model's name for a checkpoint tensor, or None for a tensor of another part
        (a vision tower) that the text GGUF leaves out."""
        return name

    def ignored(self, hf_name: str) -> bool:
        """Checkpoint entries that carry no weights for llama.cpp (recomputed buffers)."""
        return hf_name.endswith("rotary_emb.inv_freq")

    def gguf_name(self, hf_name: str) -> str | None:
        # state-space layers' time-step bias (dt_bias) is what gguf's map knows as dt_proj.bias
        return self.name_map.get_name(hf_name.replace(".dt_bias", ".dt_proj.bias"), try_suffixes=(".weight", ".bias"))

    def transform(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        return x

    def row_local(self, hf_name: str) -> bool:
        """Whether `transform` works on any block of rows (so big tensors can be streamed in chunks)."""
        return True

    def untransform(self, gguf_name: str, x: np.ndarray) -> np.ndarray:
        """The inverse of `transform`, for export-hf."""
        return x

    def fused_tensors(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        """The checkpoint's tensors that `prepare` splits (GPT-OSS's experts, DeepSeek-V3's kv_b_proj):
        name -> (the `expected_tensors` they split into, its shape); `join` puts them together again."""
        return {}

    def joined_tensors(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        """The tensors export-hf writes, from `expected_tensors`' (`shapes`: their shapes in the checkpoint):
        name -> (its parts, its shape). Each its own, except the `fused_tensors`."""
        out = {name: ((name,), shape) for name, shape in shapes.items()}
        for name, (parts, shape) in self.fused_tensors().items():
            for part in parts:
                del out[part]
            out[name] = (parts, shape)
        return out

    def join(self, name: str, parts: list[np.ndarray]) -> np.ndarray:
        """A checkpoint tensor from its parts (`joined_tensors`)."""
        (x,) = parts
        return x

    def checkpoint_shape(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the checkpoint stores a tensor in, given its GGUF shape: the inverse of a reshape in
        `prepare` (a convolution's squeezed (channels, 1, kernel) weight), for export-hf."""
        return shape

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        if self.llama3_rope_freqs and self.rope.get("rope_type", "").lower() == "llama3":
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            yield name, llama3_rope_factors(self.rope, self.head_dim)

    # --- tokenizer ------------------------------------------------------------------------------
    verbatim_added_tokens = False  # Phi-3's converter reads added tokens its own way (see load_sentencepiece)

    def load_vocab(self, root: Path) -> Vocab:
        """The tokenizer as llama.cpp's converter reads it for this family: the first of `tokenizers`
        whose file the checkpoint has, with the family's own settings (`tokenizer_settings`)."""
        vocab = load_vocab(root, self.tokenizer_size, self.tokenizers, self.verbatim_added_tokens)
        self.tokenizer_settings(root, vocab)
        return vocab

    @property
    def tokenizer_size(self) -> int:
        """The tokens written: the config's vocab_size (Granite's hybrid pads it)."""
        return self.config["vocab_size"]

    def tokenizer_settings(self, root: Path, vocab: Vocab) -> None:
        """What the family's converter writes beyond the common reading (Llama: add_prefix_space from
        tokenizer_config.json; Gemma: no space prefix)."""
        if self.reads_add_prefix_space and (prefix := tokenizer_config(root).get("add_prefix_space")) is not None:
            vocab.add_space_prefix = prefix

    # --- export-hf: GGUF metadata -> config.json ----------------------------------------------
    # head_dim written even where it is d / heads: the family's transformers config defaults it to another size
    export_head_dim = False

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
        if (kl := kv.get(f"{a}.attention.key_length")) is not None and (cls.export_head_dim or kl != d // n_head):
            cfg["head_dim"] = kl
        if cls.experts is not None:
            cfg.update({cls.experts.count_key: kv[f"{a}.expert_count"],
                        "num_experts_per_tok": kv[f"{a}.expert_used_count"]})
        return cfg

    @classmethod
    def config_from_tensors(cls, cfg: dict, values: Callable[[str], np.ndarray | None]) -> dict:
        """`config_from_gguf`'s config with what only the GGUF's tensors tell (Gemma 4: which layers share
        keys and values, how much of a head RoPE turns); `values(name)`: a tensor's values, None if absent."""
        return cfg


class ImageTextModel:
    """Image-text checkpoints (Gemma 3 4B/12B/27B, Mistral Small 3.1, Qwen3.5): the text model, as llama.cpp
    converts it (the vision tower and projector belong in a separate mmproj file). Its tensors sit
    under language_model.model. (the original releases) or model.language_model. (later transformers)."""

    PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                "language_model.lm_head.": "lm_head."}
    OTHER_PARTS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
                   "model.visual.")

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith(self.OTHER_PARTS):
            return None
        for prefix, text in self.PREFIXES.items():
            if name.startswith(prefix):
                return text + name[len(prefix):]
        return name
