"""Packed integer checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized): unpack each linear
layer's codes, scales and zero points, and present it as a float32 `<prefix>.weight` holding exactly
the dequantized values. Whether those values then fit a GGUF block grid exactly (and are written
with their codes) is decided by `prequantized.fit_grid`, like any float checkpoint.

Layouts (int32 words, `bits`-wide fields, field i at bit offset bits*i):
- GPTQ (AutoGPTQ/GPTQModel "gptq" format): qweight (in/pf, out) packs the input dim; qzeros
  (groups, out/pf) packs the output dim and stores zero-1; scales (groups, out); g_idx (in,) maps
  each input row to its group (act-order permutes it). W[o, i] = s[g(i), o] * (q[i, o] - z[g(i), o]).
- AWQ GEMM (AutoAWQ): qweight (in, out/8) and qzeros (in/group, out/8) pack the output dim in the
  interleaved order 0 2 4 6 1 3 5 7; scales (in/group, out). W[o, i] = s * (q - z).
- compressed-tensors pack-quantized (llm-compressor): weight_packed (out, in/pf) packs the input dim,
  codes stored as q + 2^(bits-1); weight_scale (out, groups); optional weight_zero_point packed along
  the output dim (out/pf, groups), same offset; weight_shape. W = s * (q - zp).
- MXFP4 (transformers' "mxfp4", GPT-OSS's experts): `<name>_blocks` (..., groups, 16) holds 32 E2M1
  codes per group, two a byte, the even element in the low nibble; `<name>_scales` (..., groups) the
  groups' E8M0 exponents. The family that has them reads them (`mxfp4_to_ggml`).
"""

from __future__ import annotations

import numpy as np

from ggufkit.errors import GgufkitError

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])


def unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> int32 fields, the fields of each word laid out consecutively along `axis`."""
    pf = 32 // bits
    w = words.view(np.uint32)
    fields = np.stack([(w >> (bits * i)) & ((1 << bits) - 1) for i in range(pf)], axis=axis + 1)
    shape = list(w.shape)
    shape[axis] *= pf
    return fields.reshape(shape).astype(np.int32)


def _dequant(q: np.ndarray, zero: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 scale * (code - zero), elementwise on (out, in) arrays: exact for small codes."""
    return (scale.astype(np.float32) * (q - zero).astype(np.float32)).astype(np.float32)


def gptq_weight(t: dict, bits: int) -> np.ndarray:
    q = unpack(t["qweight"], bits, 0)  # (in, out)
    zeros = unpack(t["qzeros"], bits, 1) + 1  # (groups, out); the format stores zero - 1
    g = t["g_idx"].astype(np.int64) if "g_idx" in t else np.arange(q.shape[0]) // (q.shape[0] // len(zeros))
    return _dequant(q, zeros[g], t["scales"][g]).T


def awq_weight(t: dict, bits: int) -> np.ndarray:
    def unpack_awq(words):
        fields = unpack(words, bits, 1)  # (rows, out) in packed order
        n = fields.shape[1] // len(AWQ_ORDER)
        order = (np.arange(n)[:, None] * len(AWQ_ORDER) + AWQ_ORDER[None, :]).ravel()
        out = np.empty_like(fields)
        out[:, order] = fields
        return out
    q, zeros, scales = unpack_awq(t["qweight"]), unpack_awq(t["qzeros"]), t["scales"]
    group = q.shape[0] // len(scales)
    g = np.arange(q.shape[0]) // group
    return _dequant(q, zeros[g], scales[g]).T


def compressed_weight(t: dict, bits: int) -> np.ndarray:
    out, cols = (int(v) for v in t["weight_shape"])
    offset = 1 << (bits - 1)
    q = unpack(t["weight_packed"], bits, 1)[:, :cols] - offset  # (out, in), signed codes
    scale = t["weight_scale"]  # (out, groups)
    zp = (unpack(t["weight_zero_point"], bits, 0)[:out] - offset) if "weight_zero_point" in t else np.zeros_like(scale, np.int32)
    g = np.arange(cols) // (cols // scale.shape[1])
    return _dequant(q, zp[:, g], scale[:, g])


def mxfp4_to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 blocks and scales -> ggml's block_mxfp4 bytes (..., groups * 17): the exponent, then byte j
    holding code j in its low nibble and code j + 16 in its high one. Both formats use the same E8M0
    exponent and E2M1 codes, so only bits move (as llama.cpp's converter repacks them)."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([scales[..., None], packed], axis=-1).reshape(*blocks.shape[:-2], -1)


# quant_method -> (component suffixes that identify a packed layer, dequantizer)
FORMATS = {
    "gptq": (("qweight", "qzeros", "scales", "g_idx"), gptq_weight),
    "awq": (("qweight", "qzeros", "scales"), awq_weight),
    "compressed-tensors": (("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
                           compressed_weight),
}

# quant_methods whose tensors the family reads itself (GPT-OSS: MXFP4 experts, the rest in floats)
FAMILY_FORMATS = ("mxfp4",)


def packed_format(config: dict, path) -> tuple[str, int] | None:
    """(quant_method, bits) from config.json's quantization_config; None for float checkpoints and for
    the formats a family reads itself."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method in FAMILY_FORMATS:
        return None
    if method not in FORMATS:
        raise GgufkitError(f"unsupported quantization_config.quant_method {method!r}; "
                           f"supported: {', '.join((*FORMATS, *FAMILY_FORMATS))}", path)
    if method == "compressed-tensors":
        if qc.get("format") not in ("pack-quantized", None):
            raise GgufkitError(f"unsupported compressed-tensors format {qc.get('format')!r} (pack-quantized only)", path)
        groups = qc.get("config_groups", {})
        bits = next((g["weights"]["num_bits"] for g in groups.values() if g.get("weights")), 4)
    else:
        bits = qc.get("bits", qc.get("w_bit", 4))
    if method == "awq" and qc.get("version", "gemm").lower() != "gemm":
        raise GgufkitError(f"unsupported AWQ version {qc.get('version')!r} (GEMM packing only)", path)
    if 32 % bits:
        raise GgufkitError(f"unsupported {method} bit width {bits}", path)
    return method, bits
