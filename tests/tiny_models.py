"""Tiny random checkpoints built by transformers itself (so tensor names and shapes come from the
reference implementation, not from our converter), with real tokenizer files: SmolLM2's, or one of
the vocabularies llama.cpp ships for its tokenizer tests (Llama 3, Qwen2, Llama 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, vocab_size=49152,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

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
}
# not in CONFIGS: transformers' generate() needs pixel inputs for it; tested against llama.cpp's converter
GEMMA3_MULTIMODAL = ("Gemma3TextConfig", "Gemma3ForConditionalGeneration", CONFIGS["gemma3"][2])


def build(family: str, folder: Path, tokenizer_src: Path, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    import torch
    import transformers

    cfg_cls, model_cls, extra = GEMMA3_MULTIMODAL if family == "gemma3-multimodal" else CONFIGS[family]
    config = getattr(transformers, cfg_cls)(**{**_COMMON, **extra, **overrides})
    if family == "gemma3-multimodal":
        # the text model above inside Gemma 3's image-text wrapper, with a minimal vision tower
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=8)
        config = transformers.Gemma3Config(text_config=config.to_dict(), vision_config=vision,
                                           mm_tokens_per_image=4)
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        # Large random weights make the logits peaked, so greedy decoding is not decided by rounding noise.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if family != "gemma3" else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy(tokenizer_src / name, folder / name)
    return folder


def llama_cpp_vocab(name: str, folder: Path) -> dict:
    """Tokenizer files (export-hf's) for one of the real vocabularies llama.cpp's source ships for its
    tokenizer tests (models/ggml-vocab-<name>.gguf) written into `folder`; returns its GGUF metadata."""
    from ggufkit.convert.export_hf import write_tokenizer
    from ggufkit.runtime.header import read_header
    from tests.reference import llama_cpp_source

    kv = read_header(llama_cpp_source() / "models" / f"ggml-vocab-{name}.gguf", arrays=True).metadata
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, kv)
    return kv
