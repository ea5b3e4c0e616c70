"""llama.cpp's quantization mixtures: which GGML type each tensor of a model gets for a file type
such as Q4_K_M (more bits for attn_v / ffn_down in chosen layers, Q6_K output, GQA and MoE bumps,
fallbacks for rows that do not fill a 256-block), plus the user's overrides.

Re-expressed from the behaviour of llama-quantize (src/llama-quant.cpp), restricted to the file types
below; tests/test_quantize.py checks every choice against llama-quantize on real models. Used by both
ways to a quantized file, convert (a checkpoint in one pass) and quantize (GGUF -> GGUF): each
describes the model by its GGUF metadata (`model_info`) and its tensors (`TensorMeta`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ggufkit.errors import GgufkitError
from ggufkit.kquants.api import FLOAT_TYPES

Q = GGMLQuantizationType
F = LlamaFileType

# mixture name -> (file type written to general.file_type, the type most tensors get)
MIXTURES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "Q8_0": (F.MOSTLY_Q8_0, Q.Q8_0),
    "Q6_K": (F.MOSTLY_Q6_K, Q.Q6_K),
    "Q5_K_M": (F.MOSTLY_Q5_K_M, Q.Q5_K),
    "Q5_K_S": (F.MOSTLY_Q5_K_S, Q.Q5_K),
    "Q4_K_M": (F.MOSTLY_Q4_K_M, Q.Q4_K),
    "Q4_K_S": (F.MOSTLY_Q4_K_S, Q.Q4_K),
    "Q3_K_L": (F.MOSTLY_Q3_K_L, Q.Q3_K),
    "Q3_K_M": (F.MOSTLY_Q3_K_M, Q.Q3_K),
    "Q3_K_S": (F.MOSTLY_Q3_K_S, Q.Q3_K),
    "Q2_K": (F.MOSTLY_Q2_K, Q.Q2_K),
    "Q2_K_S": (F.MOSTLY_Q2_K_S, Q.Q2_K),
    "IQ4_XS": (F.MOSTLY_IQ4_XS, Q.IQ4_XS),
    "IQ4_NL": (F.MOSTLY_IQ4_NL, Q.IQ4_NL),
    "IQ3_M": (F.MOSTLY_IQ3_M, Q.IQ3_S),
    "IQ3_S": (F.MOSTLY_IQ3_S, Q.IQ3_S),
    "IQ3_XS": (F.MOSTLY_IQ3_XS, Q.IQ3_S),
    "IQ3_XXS": (F.MOSTLY_IQ3_XXS, Q.IQ3_XXS),
    "IQ2_M": (F.MOSTLY_IQ2_M, Q.IQ2_S),
    "IQ2_S": (F.MOSTLY_IQ2_S, Q.IQ2_XS),
    "IQ2_XS": (F.MOSTLY_IQ2_XS, Q.IQ2_XS),
    "IQ2_XXS": (F.MOSTLY_IQ2_XXS, Q.IQ2_XXS),
    "IQ1_M": (F.MOSTLY_IQ1_M, Q.IQ1_M),
    "IQ1_S": (F.MOSTLY_IQ1_S, Q.IQ1_S),
    "Q5_1": (F.MOSTLY_Q5_1, Q.Q5_1),
    "Q5_0": (F.MOSTLY_Q5_0, Q.Q5_0),
    "Q4_1": (F.MOSTLY_Q4_1, Q.Q4_1),
    "Q4_0": (F.MOSTLY_Q4_0, Q.Q4_0),
    "TQ2_0": (F.MOSTLY_TQ2_0, Q.TQ2_0),
    "TQ1_0": (F.MOSTLY_TQ1_0, Q.TQ1_0),
    "MXFP4_MOE": (F.MOSTLY_MXFP4_MOE, Q.MXFP4),
    "F16": (F.MOSTLY_F16, Q.F16),
    "BF16": (F.MOSTLY_BF16, Q.BF16),
    "F32": (F.ALL_F32, Q.F32),
}

# A row length that is not a multiple of the type's block falls back to a 32-block type.
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
            Q.IQ4_XS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL, Q.IQ3_XXS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL,
            Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ1_S: Q.IQ4_NL,
            Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0}

# Types whose quantizers produce garbage without importance data (outside token_embd / output).
IMATRIX_REQUIRED = {Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S}

# The 1-2 bit mixtures: Q5_K output, smaller token_embd, and rules of their own for the layers.
LOW_BIT = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")

# 2-D weights llama.cpp never quantizes: routers, tiny or positional tables, convolutions.
KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                   "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                   "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
                   "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
                   "mm.a.code_embd") + tuple(f"time_mix_{s}.weight" for s in (
                       "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
                       "decay_w1", "decay_w2", "lerp_fused"))
KEEP_NAMES = ("position_embd.weight", "token_types.weight")
TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")

# First match wins, in this order (attn_qkv before attn_v/attn_k...).
CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
              ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
              ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
              ("ffn_down", "ffn_down"))


@dataclass(frozen=True)
class TensorMeta:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length, ne[2] the expert count of 3-D tensors
    qtype: GGMLQuantizationType  # its type in the input file


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters the rules look at: made by `model_info`."""
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B, which gets more bits on attn_v
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


def model_info(metadata: Mapping) -> ModelInfo:
    """The hyper-parameters of a model from its GGUF metadata as plain values: a GGUF header's, or
    what a checkpoint's family writes (convert chooses types as if quantizing its own F32 file)."""
    arch = str(metadata.get("general.architecture", "unknown"))

    def value(key: str, default: int) -> int:
        v = metadata.get(f"{arch}.{key}", default)
        return int(v[0] if isinstance(v, list) else v)  # per-layer arrays: llama.cpp's n_gqa() uses layer 0

    n_head = value("attention.head_count", 0)
    return ModelInfo(arch, value("block_count", 0), n_head, value("attention.head_count_kv", n_head),
                     value("expert_count", 0))


@dataclass
class Options:
    overrides: list[tuple[re.Pattern, GGMLQuantizationType]] = field(default_factory=list)
    output_type: GGMLQuantizationType | None = None
    token_embd_type: GGMLQuantizationType | None = None
    pure: bool = False


def parse_qtype(text: str, what: str = "type") -> GGMLQuantizationType:
    try:
        return Q[text.strip().upper()]
    except KeyError:
        raise GgufkitError(f"invalid {what} {text!r}") from None


def parse_override(text: str) -> tuple[re.Pattern, GGMLQuantizationType]:
    """'REGEX=TYPE' as llama-quantize's --tensor-type reads it: the pattern is lower-cased, searched."""
    pattern, sep, qtype = text.partition("=")
    if not sep or not pattern or not qtype:
        raise GgufkitError(f"malformed --tensor-type {text!r} (expected REGEX=TYPE)")
    try:
        regex = re.compile(pattern.lower())
    except re.error as exc:
        raise GgufkitError(f"invalid --tensor-type pattern {pattern!r}: {exc}") from None
    return regex, parse_qtype(qtype, "--tensor-type type")


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in TOKEN_EMBD_NAMES:
        return "token_embd"
    return next((cat for key, cat in CATEGORIES if key in name), "other")


def n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    dims = len(ne)
    while dims > 1 and ne[dims - 1] == 1:
        dims -= 1
    return dims


def allows_quantization(t: TensorMeta) -> bool:
    return (n_dims(t.ne) >= 2 and t.name.endswith("weight") and t.name not in KEEP_NAMES
            and not any(s in t.name for s in KEEP_SUBSTRINGS))


def layer_of(name: str) -> int:
    m = re.match(r"blk\.(-?\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(tensors):
    """llama.cpp's loader order (global tensors, then by layer, then by name): the rules count layers
    in this order and llama-quantize writes the tensors in it."""
    return sorted(tensors, key=lambda t: (layer_of(t.name), t.name))


def use_more_bits(i: int, n: int) -> bool:
    """The layers that get extra bits: the first and last eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _Counters:
    """Per-category layer counters: the rules see layers in the order tensors are visited."""

    def __init__(self, tensors: list[TensorMeta], n_layer: int):
        self.n_attn_v = sum(category(t.name) == "attn_v" for t in tensors)
        self.i_attn_v = 0
        self.i_ffn_down = 0
        self.i_ffn = {"ffn_gate": 0, "ffn_up": 0}
        self.n_ffn_down = n_layer  # llama.cpp's n_ffn_down = n_ffn_gate = n_ffn_up


def _output_type(mixture: str, model: ModelInfo, t: TensorMeta, new: GGMLQuantizationType,
                 opts: Options) -> GGMLQuantizationType:
    if opts.output_type is not None:
        return opts.output_type
    if mixture == "MXFP4_MOE" or model.arch == "falcon" or t.ne[0] % GGML_QUANT_SIZES[new][0]:
        return Q.Q8_0
    if mixture in LOW_BIT or mixture == "IQ3_XXS":
        return Q.Q5_K
    return new if new == Q.Q8_0 else Q.Q6_K


def _token_embd_type(mixture: str, new: GGMLQuantizationType) -> GGMLQuantizationType:
    """token_embd when it is not also the output."""
    if mixture in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
        return Q.Q2_K
    if mixture in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
        return Q.IQ3_S
    if mixture in ("TQ1_0", "TQ2_0"):
        return Q.Q4_K
    return new


def _low_bit_type(mixture: str, model: ModelInfo, cat: str, new: GGMLQuantizationType,
                  counters: _Counters) -> GGMLQuantizationType:
    """The layers of the LOW_BIT mixtures: attn_v, the first eighth of ffn_down (counted over all
    ffn_down tensors, experts' too) and attn_output get more bits."""
    wider = Q.IQ3_S if mixture in ("IQ2_S", "IQ2_M") else Q.Q2_K
    if cat == "attn_v":
        counters.i_attn_v += 1
        return Q.Q4_K if model.n_gqa >= 4 or model.n_expert >= 4 else wider
    if cat == "attn_k" and model.n_expert == 8:
        return Q.Q4_K
    if cat == "ffn_down":
        i = counters.i_ffn_down
        counters.i_ffn_down += 1
        return wider if i < counters.n_ffn_down // 8 else new
    if cat == "attn_output":
        if model.n_expert == 8:
            return Q.Q5_K
        if mixture in ("IQ1_S", "IQ1_M"):
            return Q.IQ2_XXS
        if mixture in ("IQ2_S", "IQ2_M"):
            return Q.IQ3_S
    return new


def _attn_v_type(mixture: str, model: ModelInfo, i: int, n: int, new: GGMLQuantizationType,
                 has_imatrix: bool) -> GGMLQuantizationType:
    gqa4 = model.n_gqa >= 4
    if mixture == "Q2_K":
        new = Q.Q4_K if gqa4 else Q.Q3_K
    elif mixture == "Q2_K_S" and gqa4:
        new = Q.Q4_K
    elif mixture == "IQ3_XXS":
        new = Q.Q4_K if gqa4 else Q.IQ3_XXS if has_imatrix else Q.IQ3_S
    elif mixture in ("IQ3_XS", "IQ3_S") and gqa4 or mixture == "IQ3_M":
        new = Q.Q4_K
    elif mixture == "Q3_K_M":
        new = Q.Q5_K if i < 2 else Q.Q4_K
    elif mixture == "Q3_K_L":
        new = Q.Q5_K
    elif mixture in ("IQ4_NL", "IQ4_XS") and gqa4:
        new = Q.Q5_K
    elif mixture in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        new = Q.Q6_K
    elif mixture == "Q4_K_S" and i < 4:
        new = Q.Q5_K
    if model.is_70b and new in (Q.Q3_K, Q.Q4_K):
        new = Q.Q5_K  # 8 heads share attn_v: it is small, so more bits cost little
    if model.n_expert == 8:
        new = Q.Q8_0
    return new


def _ffn_down_type(mixture: str, model: ModelInfo, i: int, n: int, new: GGMLQuantizationType,
                   has_imatrix: bool) -> GGMLQuantizationType:
    falcon = model.arch == "falcon"
    if mixture == "Q2_K":
        return Q.Q3_K
    if mixture == "Q2_K_S":
        return Q.Q4_K if i < n // 8 else new
    if mixture == "IQ3_XXS" and not has_imatrix:
        return Q.Q4_K if i < n // 8 else Q.Q3_K
    if mixture == "IQ3_M" and (i < n // 8 or model.n_expert == 8 and use_more_bits(i, n)):
        return Q.Q4_K
    if mixture == "Q3_K_M":
        return Q.Q5_K if i < n // 16 else Q.Q4_K if not falcon or use_more_bits(i, n) else Q.Q3_K
    if mixture == "Q3_K_L":
        return Q.Q4_K if falcon else Q.Q5_K
    if mixture == "Q4_K_M":
        if falcon:
            return Q.Q6_K if i < n // 16 else Q.Q5_K if use_more_bits(i, n) else Q.Q4_K
        return Q.Q6_K if use_more_bits(i, n) else new
    if mixture in ("IQ4_NL", "IQ4_XS") and not has_imatrix and i < n // 8:
        return Q.Q5_K
    if mixture == "Q5_K_M" and use_more_bits(i, n):
        return Q.Q6_K
    if mixture == "Q4_K_S" and not falcon and i < n // 8:
        return Q.Q5_K
    if mixture in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        # the first ffn_down layers can go wrong even with an imatrix; only then, so that the result
        # without one stays what it always was
        return Q.Q4_1 if mixture == "Q4_0" else Q.Q5_1
    return new


def _attn_output_type(mixture: str, model: ModelInfo, new: GGMLQuantizationType) -> GGMLQuantizationType:
    if model.arch == "falcon":
        return Q.Q4_K if mixture == "Q3_K_L" else new
    if model.n_expert == 8:
        bumped = ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M",
                  "IQ4_XS")
        return Q.Q5_K if mixture in bumped else new
    return {"Q2_K": Q.Q3_K, "IQ3_XXS": Q.IQ3_S, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K, "IQ3_M": Q.Q4_K}.get(mixture, new)


def _is_expert_tensor(model: ModelInfo, t: TensorMeta) -> bool:
    """A 3-D tensor of experts (bailingmoe3's 3-D MLA projections are not experts)."""
    experts = len(t.ne) > 2 and t.ne[2] > 1
    return experts and (model.arch != "bailingmoe3" or category(t.name) in ("ffn_up", "ffn_gate", "ffn_down"))


def _mixture_type(mixture: str, model: ModelInfo, t: TensorMeta, new: GGMLQuantizationType, opts: Options,
                  has_imatrix: bool, tied: bool, counters: _Counters) -> GGMLQuantizationType:
    """The mixture's choice for one tensor, before the shape fallback."""
    cat = category(t.name)
    if cat == "output" or (tied and cat == "token_embd"):  # tied: token_embd is also the output
        return _output_type(mixture, model, t, new, opts)
    if mixture == "MXFP4_MOE":
        return Q.MXFP4 if _is_expert_tensor(model, t) else Q.Q8_0
    if cat == "token_embd":
        return _token_embd_type(mixture, new)
    if mixture in LOW_BIT:
        return _low_bit_type(mixture, model, cat, new, counters)
    # experts of one layer are not stored consecutively: their layer comes from the name
    layer = layer_of(t.name) if model.n_expert > 1 else None
    if cat == "attn_v":
        new = _attn_v_type(mixture, model, counters.i_attn_v, counters.n_attn_v, new, has_imatrix)
        counters.i_attn_v += 1
    elif cat == "attn_k" and model.n_expert == 8:
        new = Q.Q8_0
    elif cat in ("attn_k", "attn_q"):
        new = {"IQ3_XS": Q.IQ3_XXS, "IQ3_XXS": Q.IQ2_S}.get(mixture, new)
    elif cat == "ffn_down":
        i = counters.i_ffn_down if layer is None else layer
        new = _ffn_down_type(mixture, model, i, counters.n_ffn_down, new, has_imatrix)
        counters.i_ffn_down += 1
    elif cat == "attn_output":
        new = _attn_output_type(mixture, model, new)
    elif cat in ("ffn_gate", "ffn_up"):
        i = counters.i_ffn[cat] if layer is None else layer
        if mixture == "IQ3_XS" and counters.n_ffn_down // 8 <= i < 7 * counters.n_ffn_down // 8:
            new = Q.IQ3_XXS
        counters.i_ffn[cat] += 1
    return new


def fallback(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """A type whose block fits the row length: `qtype`, else a 32-block relative, else F16."""
    if row_length % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if row_length % GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def choose_types(tensors: list[TensorMeta], model: ModelInfo, mixture: str, opts: Options | None = None,
                 has_imatrix: bool = False) -> dict[str, GGMLQuantizationType]:
    """{tensor name: type in the output} for every tensor, as llama-quantize would choose."""
    opts = opts or Options()
    default = MIXTURES[mixture][1]
    tensors = llama_order(tensors)
    tied = not any(t.name == "output.weight" for t in tensors)
    counters = _Counters(tensors, model.n_layer)
    return {t.name: _tensor_type(t, mixture, model, default, opts, has_imatrix, tied, counters) for t in tensors}


def _tensor_type(t: TensorMeta, mixture: str, model: ModelInfo, default: GGMLQuantizationType, opts: Options,
                 has_imatrix: bool, tied: bool, counters: _Counters) -> GGMLQuantizationType:
    if not allows_quantization(t):
        return t.qtype
    cat = category(t.name)
    override = next((qt for regex, qt in opts.overrides if regex.search(t.name)), None)
    # per_layer_token_embd is a large separate table: an explicit --tensor-type beats --token-embedding-type
    named = t.name == "per_layer_token_embd.weight" and override is not None
    if opts.token_embd_type is not None and cat == "token_embd" and not named:
        return opts.token_embd_type
    if opts.output_type is not None and cat == "output":
        return opts.output_type
    if default in FLOAT_TYPES:
        return default
    if override is not None:
        return fallback(override, t.ne[0])
    new = default if opts.pure else _mixture_type(mixture, model, t, default, opts, has_imatrix, tied, counters)
    return fallback(new, t.ne[0])


def requires_imatrix(name: str, qtype: GGMLQuantizationType, mixture: str) -> bool:
    """Tensors whose type is useless without an importance matrix (llama-quantize refuses them)."""
    if name in TOKEN_EMBD_NAMES or name == "output.weight":
        return False
    return qtype in IMATRIX_REQUIRED or (qtype == Q.Q2_K and mixture == "Q2_K_S")
