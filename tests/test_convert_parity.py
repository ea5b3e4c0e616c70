"""Parity with llama.cpp's own convert_hf_to_gguf.py on real checkpoints (exported with export-hf)
and on tiny checkpoints of every supported family: the same metadata and byte-identical tensors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from ggufkit.gguffile.reader import read_header, tensor_data
from reference.llama_cpp import hf_to_gguf
from tests import tiny_models

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow, pytest.mark.torch, pytest.mark.tools, pytest.mark.models]
TYPES = ["F32", "F16", "BF16", "Q8_0"]
# Provenance that legitimately differs between runs and tools.
IGNORED_KEYS = ("general.quantized_by", "general.source", "general.uuid")


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def checkpoint(request):
    return request.getfixturevalue(f"{request.param}_hf")


class Gguf:
    """A file's metadata (provenance keys left out) and tensors, through ggufkit's reader: gguf-py's
    GGUFReader takes 8 s per file to parse a 151k-token vocabulary (tests/test_gguffile checks that
    both readers read a real model alike)."""

    def __init__(self, path):
        self.header = read_header(path, arrays=True)
        self.kv = {k: v for k, v in self.header.metadata.items() if not k.startswith(IGNORED_KEYS)}
        self.tensors = {t.name: t for t in self.header.tensors}

    def data(self, name: str) -> np.ndarray:
        return tensor_data(self.header, self.tensors[name])


@pytest.mark.parametrize("out_type", TYPES)
def test_same_metadata_and_tensor_bytes_as_llama_cpp(checkpoint, out_type, tmp_path):
    assert_converts_like_llama_cpp(checkpoint, out_type, tmp_path)


def test_gemma3_image_text_checkpoint_converts_its_text_model(gemma3_hf, tmp_path):
    """Gemma 3's 4B/12B/27B checkpoints wrap the text model (language_model.*) with a vision tower:
    a tiny one built by transformers converts as llama.cpp's converter converts it."""
    # 262208 rows, as the real ones have: 64 padding rows past the tokenizer's 262144 tokens
    ckpt = tiny_models.build("gemma3-multimodal", tmp_path / "hf", gemma3_hf, vocab_size=262208)
    assert_converts_like_llama_cpp(ckpt, "F32", tmp_path)


@pytest.mark.parametrize("family", sorted(tiny_models.CONFIGS))
def test_every_family_converts_like_llama_cpp(family, smollm2_hf, tmp_path):
    """Tiny checkpoints of each supported family (transformers' own configs and tensor names): the
    same metadata and tensors as llama.cpp's converter writes. Qwen's carry Qwen2's real vocabulary
    (llama.cpp's converter does not take SmolLM2's tokenizer for them), Gemma 2's, Phi-3's, ERNIE's and
    Gemma 4's Llama 2's SentencePiece one (their converters read only tokenizer.model, Gemma 4's only a
    SentencePiece-style tokenizer.json), GLM-4's SmolLM2's with GLM's added tokens, the others SmolLM2's."""
    tokenizer, overrides = tiny_models.tokenizer_for(family, smollm2_hf, tmp_path / "vocab")
    ckpt = tiny_models.build(family, tmp_path / "hf", tokenizer, **overrides)
    assert_converts_like_llama_cpp(ckpt, "F32", tmp_path)


@pytest.mark.parametrize("sliding", ["layer_types", "pattern"])
def test_exaone4_sliding_window_and_rope_scaling_convert_like_llama_cpp(sliding, smollm2_hf, tmp_path):
    """EXAONE 4.0 32B's layout on a tiny checkpoint: three in four layers attend through a sliding
    window (from layer_types, or from sliding_window_pattern where a config has no layer_types), and
    'llama3' RoPE scaling (a rope_freqs tensor). Parity only: llama.cpp runs the window for the
    64-layer model alone."""
    import json

    rope = dict(rope_type="llama3", rope_theta=1e6, factor=16.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)
    ckpt = tiny_models.build("exaone4", tmp_path / "hf", smollm2_hf, num_hidden_layers=4, sliding_window=16,
                             sliding_window_pattern=4, layer_types=None, rope_parameters=rope)
    if sliding == "pattern":
        cfg = json.loads((ckpt / "config.json").read_text())
        del cfg["layer_types"]
        (ckpt / "config.json").write_text(json.dumps(cfg))
    ours = assert_converts_like_llama_cpp(ckpt, "F32", tmp_path)
    assert ours.kv["exaone4.attention.sliding_window_pattern"] == [True, True, True, False]
    assert "rope_freqs.weight" in ours.tensors


@pytest.mark.parametrize("out_type", TYPES)
def test_gpt_oss_mxfp4_experts_are_written_as_llama_cpp_writes_them(out_type, smollm2_hf, tmp_path):
    """GPT-OSS's released checkpoints hold the experts in MXFP4 (blocks and scales): llama.cpp's
    converter repacks those bytes into ggml's MXFP4 blocks whatever --outtype, and names a float file
    MXFP4_MOE. ggufkit writes the same bytes, also for blocks whose exponent ggml's own quantizer
    would not pick (see with_mxfp4_experts), so the codes are copied, not requantized."""
    ckpt = tiny_models.with_mxfp4_experts(tiny_models.build("gpt_oss", tmp_path / "hf", smollm2_hf))
    ours = assert_converts_like_llama_cpp(ckpt, out_type, tmp_path)
    experts = [t for name, t in ours.tensors.items() if "_exps.weight" in name]
    assert {t.type for t in experts} == {gguf.GGMLQuantizationType.MXFP4}


@pytest.mark.parametrize("family", ["qwen3_5moe", "granite_hybrid"])
def test_hybrid_families_convert_like_llama_cpp_in_q8_0(family, smollm2_hf, tmp_path):
    """The hybrids' state-space tensors in a Q8_0 file: which stay F32 (A, D, dt, the convolutions, the
    norms), which take the type (DeltaNet's and Mamba-2's projections), as llama.cpp's converter writes
    them. (F16 and BF16 follow the same rules; each case costs 10-25 s, most of it llama.cpp's converter.)"""
    tokenizer, overrides = tiny_models.tokenizer_for(family, smollm2_hf, tmp_path / "vocab")
    ckpt = tiny_models.build(family, tmp_path / "hf", tokenizer, **overrides)
    assert_converts_like_llama_cpp(ckpt, "Q8_0", tmp_path)


def test_granite_hybrid_pads_its_vocabulary_like_llama_cpp(smollm2_hf, tmp_path):
    """Granite's hybrids take Mamba-2's tokenizer reading: the vocabulary padded to a multiple of 8 (SmolLM2's
    with one added token: 49153 -> 49160 tokens, the embedding keeping its 49153 rows)."""
    tokenizer, overrides = tiny_models.with_added_tokens(smollm2_hf, tmp_path / "vocab", ("<|tool|>",))
    ckpt = tiny_models.build("granite_hybrid", tmp_path / "hf", tokenizer, **overrides)
    assert len(assert_converts_like_llama_cpp(ckpt, "F32", tmp_path).kv["tokenizer.ggml.tokens"]) == 49160


def test_ernie_checkpoint_under_baidus_architecture_name(smollm2_hf, tmp_path):
    """Baidu's ERNIE 4.5 checkpoints name the architecture Ernie4_5_ForCausalLM (transformers:
    Ernie4_5ForCausalLM); llama.cpp's converter takes both."""
    import json

    tokenizer, overrides = tiny_models.tokenizer_for("ernie4_5", smollm2_hf, tmp_path / "vocab")
    ckpt = tiny_models.build("ernie4_5", tmp_path / "hf", tokenizer, **overrides)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["Ernie4_5_ForCausalLM"]}))
    assert_converts_like_llama_cpp(ckpt, "F32", tmp_path)


def test_tied_checkpoint_that_stores_its_head_anyway(smollm2_hf, tmp_path):
    """tie_word_embeddings with an lm_head.weight in the file (some training exports): llama.cpp's
    converter writes it as output.weight, and so does ggufkit."""
    from safetensors.numpy import load_file, save_file

    ckpt = tiny_models.build("llama", tmp_path / "hf", smollm2_hf, tie_word_embeddings=True)
    weights = load_file(ckpt / "model.safetensors")
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 0.5
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    names = assert_converts_like_llama_cpp(ckpt, "F32", tmp_path).tensors
    assert "output.weight" in names and "token_embd.weight" in names


def assert_converts_like_llama_cpp(checkpoint, out_type, tmp_path) -> Gguf:
    from ggufkit.convert.pipeline import convert

    ours = Gguf(convert(checkpoint, tmp_path / "ours.gguf", out_type=out_type))
    ref = Gguf(hf_to_gguf(checkpoint, tmp_path / "ref.gguf", out_type.lower()))
    assert sorted(ours.kv.keys() ^ ref.kv.keys()) == []
    for key, value in ref.kv.items():
        assert ours.kv[key] == value, key
    assert sorted(ours.tensors) == sorted(ref.tensors)
    for name, t in ref.tensors.items():
        mine = ours.tensors[name]
        assert (mine.type, mine.shape) == (t.type, t.shape), name
        if name.endswith(EXP_OF_CHECKPOINT):
            ulps = np.abs(ours.data(name).view(np.int32).astype(np.int64) - ref.data(name).view(np.int32))
            assert ulps.max() <= 1, name
        else:
            assert ours.data(name).tobytes() == ref.data(name).tobytes(), name
    return ours


# F32 tensors the converter computes with torch's float32 exp (Qwen3-Next's ssm_a = -exp(A_log)), which is
# off by one ulp in about 1% of values; ggufkit's, without torch, are correctly rounded.
EXP_OF_CHECKPOINT = (".ssm_a",)


NEW_FAMILIES = ("phi3", "gemma2", "smollm3", "olmo2", "granite", "qwen3moe", "mixtral", "olmoe", "glm4", "exaone4",
                "ernie4_5", "lfm2", "gemma4", "gpt_oss", "deepseek_v3")


def _logits(folder):
    import json

    import torch
    import transformers

    # the class the checkpoint names: image-text models have no AutoModelForCausalLM mapping
    model_cls = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])
    model = model_cls.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 504, 3458, 314, 253, 1837, 30, 2339]])).logits[0].numpy()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_export_hf_inverts_convert(family, smollm2_hf, tmp_path):
    """GGUF -> export-hf -> convert gives back the same tensors and metadata (general.* aside): the
    families' transforms (Gemma's norm shift, Llama's q/k permutation, merged experts split back
    into one tensor per expert, LFM2's squeezed convolution) are inverted exactly; and transformers
    runs the exported checkpoint as it runs the original (its config read as the original's)."""
    tokenizer, overrides = tiny_models.tokenizer_for(family, smollm2_hf, tmp_path / "vocab")
    assert_export_hf_inverts_convert(tiny_models.build(family, tmp_path / "hf", tokenizer, **overrides), tmp_path)


def test_export_hf_keeps_phi3_longrope(smollm2_hf, tmp_path):
    """Phi-3's LongRoPE factors, which the GGUF keeps as tensors, come back into the exported config."""
    factors = dict(long_factor=[1.0 + 0.37 * i for i in range(8)], short_factor=[1.0 + 0.11 * i for i in range(8)])
    tokenizer, overrides = tiny_models.tokenizer_for("phi3", smollm2_hf, tmp_path / "vocab")
    ckpt = tiny_models.build("phi3", tmp_path / "hf", tokenizer, **overrides, original_max_position_embeddings=64,
                             rope_scaling=dict(rope_type="longrope", **factors))
    assert_export_hf_inverts_convert(ckpt, tmp_path)
    rope = json.loads((tmp_path / "exported" / "config.json").read_text())["rope_parameters"]
    np.testing.assert_array_equal(rope["short_factor"], np.float32(factors["short_factor"]))


def assert_export_hf_inverts_convert(ckpt, tmp_path):
    from ggufkit.convert.export_hf import export_hf
    from ggufkit.convert.pipeline import convert

    first = Gguf(convert(ckpt, tmp_path / "first.gguf", out_type="F32"))
    again = Gguf(convert(export_hf(tmp_path / "first.gguf", tmp_path / "exported"), tmp_path / "again.gguf",
                         out_type="F32"))
    model_kv = lambda g: {k: v for k, v in g.kv.items() if not k.startswith("general.")}  # noqa: E731
    assert model_kv(again) == model_kv(first)
    assert sorted(again.tensors) == sorted(first.tensors)
    for name in first.tensors:
        assert again.data(name).tobytes() == first.data(name).tobytes(), name
    np.testing.assert_array_equal(_logits(tmp_path / "exported"), _logits(ckpt))


def test_export_hf_of_mxfp4_gpt_oss_runs_as_its_values(smollm2_hf, tmp_path):
    """GPT-OSS's released layout (MXFP4 experts, kept as MXFP4 in the GGUF): export-hf writes the experts'
    values in floats, fused as transformers takes them, and transformers runs the export exactly as it
    runs the checkpoint dequantized by its own MXFP4 reader."""
    from ggufkit.convert.export_hf import export_hf
    from ggufkit.convert.pipeline import convert

    folder = tiny_models.with_mxfp4_experts(tiny_models.build("gpt_oss", tmp_path / "hf", smollm2_hf))
    reference = tiny_models.mxfp4_dequantized(folder, tmp_path / "dequantized")
    exported = export_hf(convert(folder, tmp_path / "m.gguf", out_type="F32"), tmp_path / "exported")
    np.testing.assert_array_equal(_logits(exported), _logits(reference))


def test_gemma4_vocabulary_survives_export_hf(tmp_path):
    """Gemma 4's real vocabulary (llama.cpp's ggml-vocab-gemma-4.gguf: control tokens beyond the named ones,
    the chat parser's tokens typed user-defined amid the others, a mask token, merges that scores cannot
    rank), as export-hf writes it, is what Gemma 4's converter reads back."""
    from ggufkit.convert.families.gemma4 import Gemma4

    kv = tiny_models.llama_cpp_vocab("gemma-4", tmp_path)
    fam = Gemma4({"num_hidden_layers": 1, "layer_types": ["full_attention"], "head_dim": 16, "num_key_value_heads": 1,
                  "global_head_dim": 32})
    vocab = fam.load_vocab(tmp_path)
    assert vocab.tokens == kv["tokenizer.ggml.tokens"]
    assert vocab.types == kv["tokenizer.ggml.token_type"]
    assert list(vocab.special.merges) == kv["tokenizer.ggml.merges"]
    assert vocab.special.special_token_ids == {role: kv[f"tokenizer.ggml.{key}_token_id"] for role, key in
                                               (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"),
                                                ("pad", "padding"), ("mask", "mask"))}
    assert vocab.special.chat_template == kv["tokenizer.chat_template"]


# Tokenizer settings real checkpoints carry, written into the tiny checkpoint's files: what llama.cpp's
# converter reads from tokenizer_config.json (add_prefix_space, add_bos_token / add_eos_token, the
# special tokens, chat_template), chat_template.jinja, special_tokens_map.json and generation_config.json
# (the sampling defaults, as general.sampling.*).
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
SETTINGS = {
    "add-prefix-space": {"tokenizer_config.json": {"add_prefix_space": False}},
    "add-bos-eos": {"tokenizer_config.json": {"add_bos_token": True, "add_eos_token": True}},
    "chat-template-jinja": {"chat_template.jinja": TEMPLATE},
    "special-tokens-map": {"special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>",
                                                       "pad_token": "<unk>"}},
    "generation-config": {"generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6,
                                                     "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}},
}


def _write_settings(folder, files: dict) -> None:
    import json

    for name, content in files.items():
        path = folder / name
        if name.endswith(".json") and path.is_file():  # tokenizer_config.json: settings on top of its own
            content = {**json.loads(path.read_text()), **content}
        if name == "chat_template.jinja":  # the file's template applies where tokenizer_config has none
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
            cfg.pop("chat_template", None)
            (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        path.write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("family", ["llama-spm", "phi3", "gemma2", "granite", "qwen3moe", "olmo2", "glm4",
                                    "ernie4_5"])
def test_tokenizer_settings_convert_like_llama_cpp(family, setting, smollm2_hf, tmp_path):
    """Each family reads the tokenizer files as its llama.cpp converter does: Llama's family writes
    add_prefix_space as the space prefix, Gemma never adds one, Phi-3 reads added tokens its own
    way; all take add_bos/add_eos, the chat template (from tokenizer_config.json or
    chat_template.jinja) and the sampling defaults as llama.cpp's converter does. `llama-spm`: a
    Llama checkpoint with Llama 2's SentencePiece vocabulary."""
    arch = "llama" if family == "llama-spm" else family
    tokenizer, overrides = tiny_models.tokenizer_for("phi3" if family == "llama-spm" else family, smollm2_hf,
                                                     tmp_path / "vocab")
    ckpt = tiny_models.build(arch, tmp_path / "hf", tokenizer, **overrides)
    _write_settings(ckpt, SETTINGS[setting])
    assert_converts_like_llama_cpp(ckpt, "F32", tmp_path)


def test_phi4_bpe_tokenizer_converts_like_llama_cpp(smollm2_hf, tmp_path):
    """Phi-4's checkpoints are Phi3ForCausalLM with a BPE tokenizer (tokenizer_class GPT2Tokenizer):
    llama.cpp's converter reads tokenizer.json for them, not tokenizer.model."""
    import json

    ckpt = tiny_models.build("phi3", tmp_path / "hf", smollm2_hf)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
    assert assert_converts_like_llama_cpp(ckpt, "F32", tmp_path).kv["tokenizer.ggml.model"] == "gpt2"


@pytest.mark.parametrize("family", ["qwen3moe", "mixtral", "olmoe", "phi3", "gpt_oss", "deepseek_v3", "qwen3next",
                                    "qwen3_5", "qwen3_5moe", "granite_hybrid", "granite_hybrid_dense", "gemma2",
                                    "smollm3", "olmo2", "granite", "glm4", "exaone4", "ernie4_5", "gemma4", "lfm2",
                                    "mistral3"])
def test_every_family_gets_llama_quantize_types(family, smollm2_hf, tmp_path):
    """The mixtures' per-tensor rules on every family's converted file: 3-D expert tensors (8 experts: the
    rules' MoE bumps; GPT-OSS's with their biases, DeepSeek-V3's, Qwen3-Next's, Qwen3.5-MoE's and Granite
    hybrid's beside shared experts, DeepSeek-V3's 3-D k_b/v_b, the DeltaNet and Mamba-2 tensors), fused
    attn_qkv, and the dense families' own tensors (post-norms, convolutions): the types llama-quantize
    --dry-run picks."""
    from ggufkit.convert.pipeline import convert
    from reference.quantize import ggufkit_types, reference_types

    tokenizer, overrides = tiny_models.tokenizer_for(family, smollm2_hf, tmp_path / "vocab")
    size = dict(hidden_size=256, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2)
    moe = dict(qwen3moe=dict(num_experts=8, moe_intermediate_size=256, head_dim=32),
               mixtral=dict(num_local_experts=8), olmoe=dict(num_experts=8, num_key_value_heads=8),
               gpt_oss=dict(num_local_experts=8, head_dim=32),
               deepseek_v3=dict(n_routed_experts=8, moe_intermediate_size=256, num_key_value_heads=8),
               qwen3next=dict(num_experts=8, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                              head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32),
               qwen3_5=dict(head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32),
               qwen3_5moe=dict(num_experts=8, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                               head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32),
               granite_hybrid=dict(num_local_experts=8, shared_intermediate_size=256, mamba_n_heads=16,
                                   mamba_d_head=32),
               granite_hybrid_dense=dict(shared_intermediate_size=256, mamba_n_heads=16, mamba_d_head=32),
               ).get(family, {})
    ckpt = tiny_models.build(family, tmp_path / "hf", tokenizer, **overrides, **{**size, **moe})
    f32 = convert(ckpt, tmp_path / "f32.gguf", out_type="F32")
    for mixture in ("Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "Q5_K_S"):
        assert ggufkit_types(f32, mixture) == reference_types(f32, mixture), mixture
