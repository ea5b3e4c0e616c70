"""Tiny random checkpoints built by transformers itself (so tensor names and shapes come from the
reference implementation, not from our converter), with real tokenizer files: SmolLM2's, or one of
the vocabularies llama.cpp ships for its tokenizer tests (Llama 3, Qwen2, Llama 2). And one written
with numpy alone (`numpy_llama`), for the tests that need neither torch nor a real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from reference import uses

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, vocab_size=49152,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

GRANITE_HYBRID = dict(num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "attention"], mamba_n_heads=8,
                      mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, num_local_experts=4, num_experts_per_tok=2,
                      intermediate_size=64, shared_intermediate_size=64, embedding_multiplier=12.0,
                      attention_multiplier=0.25, residual_multiplier=0.5, logits_scaling=2.0, pad_token_id=0)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM",
                 dict(rope_theta=500000.0, max_position_embeddings=4096,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=1e6, sliding_window=None, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1e6, head_dim=32)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=32, sliding_window=64, query_pre_attn_scalar=32, tie_word_embeddings=True,
                    num_key_value_heads=1, rope_scaling=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(rope_theta=10000.0, pad_token_id=0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, tie_word_embeddings=True,
                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, pad_token_id=0)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(num_hidden_layers=4, pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(rope_theta=500000.0, pad_token_id=0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=12.0, attention_multiplier=0.25, residual_multiplier=0.5,
                     logits_scaling=2.0, pad_token_id=0)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(rope_theta=1e6, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
    # llama.cpp's OLMoE takes no grouped-query attention (its k norm spans all query heads)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(rope_theta=10000.0, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                   intermediate_size=64, pad_token_id=0)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16, pad_token_id=0)),
    # without a sliding window: llama.cpp runs one only for the 32B model's 64 layers
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM",
                dict(sliding_window=None, layer_types=["full_attention"] * 2, pad_token_id=0)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(head_dim=16, pad_token_id=0)),
    # a window of 8 tokens on the even layers; YaRN with its correction range rounded (truncate), as
    # llama.cpp rounds it (GPT-OSS's default, unrounded, moves the logits by a few hundredths)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"],
                     rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                          beta_slow=1.0, original_max_position_embeddings=4096, truncate=True))),
    # DeepSeek-V3's layout scaled down: a dense first layer, then 4 routed experts in 2 groups (one
    # chosen) beside a shared one; q and kv through low-rank latents; YaRN with its attention scaling
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                         n_group=2, topk_group=1, n_shared_experts=1, moe_intermediate_size=32,
                         routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", q_lora_rank=32,
                         kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32.0,
                                              beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                              original_max_position_embeddings=64))),
    # Gemma 4's text model: full-attention layers with their own head size and one key head that also
    # serves as the value (attention_k_eq_v), a window of 8 tokens on the others; an image-text checkpoint
    "gemma4": ("Gemma4TextConfig", "Gemma4ForConditionalGeneration",
               dict(head_dim=16, global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=1,
                    sliding_window=8, layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                    hidden_size_per_layer_input=0, tie_word_embeddings=True, pad_token_id=0)),
    # LFM2: short convolutions in two of four layers, attention in the others; the FFN 2/3 of 128, rounded
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM",
             dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
                  block_multiple_of=32, norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0)),
    # Qwen3-Next: three DeltaNet layers (2 key heads, 4 value heads), then full attention; experts beside a
    # shared one in every layer; and the multi-token-prediction layer its checkpoints carry (with_mtp_layer)
    "qwen3next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                  dict(num_hidden_layers=4, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention"] * 3 + ["full_attention"])),
    # Qwen3.5: Qwen3-Next's layers in an image-text checkpoint (IMAGE_TEXT), the FFN dense, DeltaNet's projections
    # apart; four value heads on two key heads (which llama.cpp takes tiled); the multi-token-prediction layer
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForConditionalGeneration",
                dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                     linear_key_head_dim=16, linear_value_head_dim=16, mtp_num_hidden_layers=1,
                     layer_types=["linear_attention"] * 3 + ["full_attention"],
                     rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.25,
                                          mrope_interleaved=True, mrope_section=[1, 1, 0]))),
    # Qwen3.5-MoE: experts beside a shared one in every layer; no dense FFN size in its config; the default
    # rotary sections (11, 11, 10: llama.cpp asserts they fit in a head, so heads of 32)
    "qwen3_5moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForConditionalGeneration",
                   dict(num_hidden_layers=4, head_dim=32, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32, intermediate_size=None,
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=16, mtp_num_hidden_layers=1,
                        layer_types=["linear_attention"] * 3 + ["full_attention"])),
    # Granite 4.0 hybrid: Mamba-2 mixers (8 heads in 2 groups) in two of four layers, attention without RoPE in
    # the others; experts beside a shared MLP, or (dense) the shared MLP alone
    "granite_hybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", GRANITE_HYBRID),
    "granite_hybrid_dense": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                             {**GRANITE_HYBRID, "num_local_experts": 0, "num_experts_per_tok": 0,
                              "intermediate_size": 128, "shared_intermediate_size": 128}),
    # the text config of an image-text model (IMAGE_TEXT)
    "mistral3": ("MistralConfig", "Mistral3ForConditionalGeneration",
                 dict(rope_theta=1e6, sliding_window=None, head_dim=16)),
    # Ministral 3: YaRN, and attention scaled up past every original context (8 tokens here)
    "ministral3": ("Ministral3Config", "Mistral3ForConditionalGeneration",
                   dict(head_dim=16, sliding_window=None,
                        rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=32.0,
                                             original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0,
                                             mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))),
}
# The vocabulary each family's tiny checkpoint carries where llama.cpp's converter does not take SmolLM2's
# for it (one of those llama.cpp ships, see llama_cpp_vocab): Qwen2's BPE for Qwen, Llama 2's
# SentencePiece for the families whose converter takes only SentencePiece (tokenizer.model; Gemma 4's
# tokenizer.json, which export-hf writes for it too).
VOCABS = {"qwen2": "qwen2", "qwen3": "qwen2", "qwen3moe": "qwen2", "qwen3next": "qwen2", "qwen3_5": "qwen2",
          "qwen3_5moe": "qwen2", "gemma2": "llama-spm",
          "phi3": "llama-spm", "ernie4_5": "llama-spm", "gemma4": "llama-spm"}


# GLM-4's converter takes special tokens from GLM's own added tokens: SmolLM2's vocabulary with them appended.
ADDED_TOKENS = {"glm4": ("<|user|>",)}


def tokenizer_for(family: str, smollm2_hf: Path, folder: Path) -> tuple[Path, dict]:
    """The tokenizer folder for a family's tiny checkpoint, and the config overrides it needs
    (its vocabulary size)."""
    if family in ADDED_TOKENS:
        return with_added_tokens(smollm2_hf, folder, ADDED_TOKENS[family])
    if family not in VOCABS:
        return smollm2_hf, {}
    kv = llama_cpp_vocab(VOCABS[family], folder)
    return folder, {"vocab_size": len(kv["tokenizer.ggml.tokens"])}


def with_added_tokens(src: Path, folder: Path, texts: tuple[str, ...]) -> tuple[Path, dict]:
    """`src`'s tokenizer files in `folder`, with special tokens appended past its vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    tj = json.loads((folder / "tokenizer.json").read_text())
    n = 1 + max(*tj["model"]["vocab"].values(), *(a["id"] for a in tj["added_tokens"]))
    tj["added_tokens"] += [{"id": n + i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, text in enumerate(texts)]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    return folder, {"vocab_size": n + len(texts)}


# not in CONFIGS: transformers' generate() needs pixel inputs for it; tested against llama.cpp's converter
GEMMA3_MULTIMODAL = ("Gemma3TextConfig", "Gemma3ForConditionalGeneration", CONFIGS["gemma3"][2])
# Image-text families: their text config (above) goes inside this wrapper config, with these settings
# and a minimal vision tower (VISION, or the settings' own). Mistral's keep an lm_head, as the released
# checkpoints do.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8, head_dim=16, num_key_value_heads=2, position_embedding_size=64)
MISTRAL3 = ("Mistral3Config", dict(spatial_merge_size=2, tie_word_embeddings=False))
QWEN3_5_VISION = dict(vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                         out_hidden_size=64, patch_size=8), tie_word_embeddings=False)
IMAGE_TEXT = {"gemma3-multimodal": ("Gemma3Config", dict(mm_tokens_per_image=4)), "mistral3": MISTRAL3,
              "ministral3": MISTRAL3, "gemma4": ("Gemma4Config", dict(audio_config=None)),
              "qwen3_5": ("Qwen3_5Config", QWEN3_5_VISION), "qwen3_5moe": ("Qwen3_5MoeConfig", QWEN3_5_VISION)}


# families whose RMSNorm multiplies by (1 + w): their norm weights are drawn around 0
ONE_PLUS_NORMS = ("gemma2", "gemma3", "qwen3next", "qwen3_5")


def build(family: str, folder: Path, tokenizer_src: Path, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    uses("torch")
    import torch
    import transformers

    cfg_cls, model_cls, extra = GEMMA3_MULTIMODAL if family == "gemma3-multimodal" else CONFIGS[family]
    config = getattr(transformers, cfg_cls)(**{**_COMMON, **extra, **overrides})
    if family in IMAGE_TEXT:
        wrapper, settings = IMAGE_TEXT[family]
        config = getattr(transformers, wrapper)(text_config=config.to_dict(), **{"vision_config": VISION, **settings})
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        # Large random weights make the logits peaked, so greedy decoding is not decided by rounding noise.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if not family.startswith(ONE_PLUS_NORMS) else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
        # learned buffers that start as constants: DeepSeek-V3's expert score bias, Gemma 4's layer scalar
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
            elif name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    if family.startswith(("qwen3next", "qwen3_5")):
        with_mtp_layer(folder, seed)
    if family.startswith("granite_hybrid"):
        with_released_layer_types(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy(tokenizer_src / name, folder / name)
    return folder


def with_mtp_layer(folder: Path, seed: int = 0) -> Path:
    """Qwen3-Next's and Qwen3.5's multi-token-prediction module (mtp.*), which their released checkpoints
    carry and llama.cpp's converter requires, but transformers neither builds nor saves: one more decoder
    layer (the last, full-attention one, perturbed), the fc projection of [embedding, hidden] and three norms."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(seed)
    weights = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config = {**config, **config.get("text_config", {})}
    model = "model.language_model." if "model.language_model.norm.weight" in weights else "model."
    last = f"{model}layers.{config['num_hidden_layers'] - 1}."
    for name in [n for n in weights if n.startswith(last)]:
        x = weights[name]
        weights["mtp.layers.0." + name[len(last):]] = (x + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
    d = config["hidden_size"]
    weights["mtp.fc.weight"] = (0.15 * rng.standard_normal((d, 2 * d))).astype(np.float32)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        weights[f"mtp.{norm}.weight"] = (0.1 * rng.standard_normal(d)).astype(np.float32)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def with_released_layer_types(folder: Path) -> Path:
    """Granite 4.0 hybrid's config as IBM releases it: layer_types "mamba" / "attention", the names llama.cpp's
    converter reads (transformers reads them too, but saves its own: linear_attention / full_attention)."""
    config = json.loads((folder / "config.json").read_text())
    released = {"linear_attention": "mamba", "full_attention": "attention"}
    config["layer_types"] = [released[t] for t in config["layer_types"]]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def with_mxfp4_experts(folder: Path, seed: int = 0) -> Path:
    """GPT-OSS's released layout: each layer's fused expert projections in MXFP4 (transformers'
    `<name>_blocks`, experts x outputs x groups x 16 bytes of two E2M1 codes, and `<name>_scales`,
    their E8M0 exponents; a quantization_config saying so), with random codes: every code occurs,
    -0 included, and every other block holds magnitudes up to 1.5 units only, so its exponent is not
    the one ggml's quantizer would give its values (only a byte-for-byte copy keeps it). Units of
    2^-9 to 2^-6: weights of the other tensors' size."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(seed)
    weights = load_file(folder / "model.safetensors")
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        n_expert, cols, rows = weights.pop(name).shape  # transformers keeps them as inputs x outputs
        blocks = rng.integers(0, 256, (n_expert, rows, cols // 32, 16), dtype=np.uint8)
        blocks[..., ::2, :] &= 0xBB  # codes 0-3 and 8-11: magnitudes 0 to 1.5
        weights[name + "_blocks"] = blocks
        weights[name + "_scales"] = rng.integers(118, 122, (n_expert, rows, cols // 32), dtype=np.uint8)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def mxfp4_dequantized(folder: Path, out: Path) -> Path:
    """An MXFP4 checkpoint in floats, dequantized by transformers' own MXFP4 reader (what it runs on
    CPUs without MXFP4 kernels), in transformers' layout: a reference that needs no accelerate."""
    uses("torch")
    import torch
    from safetensors.numpy import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    shutil.copytree(folder, out)
    weights = load_file(out / "model.safetensors")
    for name in [n.removesuffix("_blocks") for n in weights if n.endswith("_blocks")]:
        blocks, scales = (torch.from_numpy(weights.pop(name + part)) for part in ("_blocks", "_scales"))
        weights[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).numpy()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def llama_cpp_vocab(name: str, folder: Path) -> dict:
    """Tokenizer files (export-hf's) for one of the real vocabularies llama.cpp's source ships for its
    tokenizer tests (models/ggml-vocab-<name>.gguf) written into `folder`; returns its GGUF metadata."""
    from ggufkit.convert.export_hf import write_tokenizer
    from ggufkit.gguffile.reader import read_header
    from reference.llama_cpp import llama_cpp_source

    kv = read_header(llama_cpp_source() / "models" / f"ggml-vocab-{name}.gguf", arrays=True).metadata
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, kv)
    return kv


def numpy_llama(folder: Path, seed: int = 0, d: int = 64, ff: int = 128, std: float = 0.15) -> Path:
    """A Llama checkpoint of 2 layers with random weights (width d, feed-forward ff; matrices of
    standard deviation std, norms around 1), and a byte-level BPE vocabulary (GPT-2's 256 byte
    characters, two merges, an end-of-text token): llama.cpp runs it."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in printable]  # GPT-2 maps the other bytes past 255
    tokens = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(moved))] + ["\u0120t", "he"]
    vocab = {t: i for i, t in enumerate(tokens)} | {"<|endoftext|>": len(tokens)}
    special = {"id": len(tokens), "content": "<|endoftext|>", "single_word": False, "lstrip": False,
               "rstrip": False, "normalized": False, "special": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {"version": "1.0", "added_tokens": [special], "normalizer": None, "pre_tokenizer": byte_level,
                 "post_processor": None, "decoder": byte_level,
                 "model": {"type": "BPE", "vocab": vocab, "merges": ["\u0120 t", "h e"]}}
    heads, kv_heads, n = 4, 2, len(vocab)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": ff, "num_hidden_layers": 2, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "vocab_size": n, "tie_word_embeddings": False,
              "bos_token_id": n - 1, "eos_token_id": n - 1}
    kv = d // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (n, d), "model.norm.weight": (d,), "lm_head.weight": (n, d)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                   p + "mlp.down_proj.weight": (d, ff)}
    rng = np.random.default_rng(seed)
    weights = {name: ((1.0 if name.endswith("norm.weight") else 0.0) + std * rng.standard_normal(shape))
               .astype(np.float32) for name, shape in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder
