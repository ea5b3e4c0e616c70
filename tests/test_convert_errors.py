"""Bad input: a one-line error naming the file, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ggufkit.cli import main
from tests import tiny_models

pytest.importorskip("transformers")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def good(smollm2_hf, tmp_path_factory):
    return tiny_models.build("llama", tmp_path_factory.mktemp("good") / "hf", smollm2_hf)


@pytest.fixture
def ckpt(good, tmp_path):
    return shutil.copytree(good, tmp_path / "ckpt")


def run_convert(capsys, src, out, *extra):
    code = main(["convert", str(src), "-o", str(out), "--type", "F16", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_failed_cleanly(code, err, out, *words):
    assert code != 0
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temp files left behind"


def _edit_weights(ckpt, fn):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_good_checkpoint_converts(ckpt, tmp_path, capsys):
    code, err = run_convert(capsys, ckpt, tmp_path / "ok.gguf")
    assert code == 0, err
    assert (tmp_path / "ok.gguf").stat().st_size > 0


def test_missing_config(ckpt, tmp_path, capsys):
    (ckpt / "config.json").unlink()
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "config.json", "missing")


def test_invalid_config(ckpt, tmp_path, capsys):
    (ckpt / "config.json").write_text("{not json")
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "config.json", "invalid JSON")


def test_unsupported_architecture_lists_supported(ckpt, tmp_path, capsys):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "FalconForCausalLM", "LlamaForCausalLM",
                          "Qwen3ForCausalLM", "Gemma3ForCausalLM")


@pytest.mark.parametrize("arch, change, words", [
    ("OlmoeForCausalLM", {"num_key_value_heads": 2}, ("OLMoE", "grouped-query")),
    ("Mistral3ForConditionalGeneration", {"text_config": {"model_type": "mistral4"}}, ("Mistral 4",)),
    ("GptOssForCausalLM", {"layer_types": ["full_attention", "sliding_attention"]}, ("GPT-OSS", "layer_types")),
    ("Gemma4ForCausalLM", {"hidden_size_per_layer_input": 256}, ("Gemma 4", "per-layer input embeddings")),
    ("GraniteMoeHybridForCausalLM", {"layer_types": ["attention", "attention"]}, ("without Mamba layers",)),
    ("GraniteMoeHybridForCausalLM", {"layer_types": ["mamba", "attention"], "position_embedding_type": "rope"},
     ("GraniteMoeHybrid", "RoPE")),
    ("GraniteMoeHybridForCausalLM", {"layer_types": ["mamba", "attention"], "num_local_experts": 0,
                                     "shared_intermediate_size": 64}, ("shared_intermediate_size",)),
])
def test_configs_llama_cpp_cannot_run_are_refused(arch, change, words, ckpt, tmp_path, capsys):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **change, "architectures": [arch]}))
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, *words)


@pytest.mark.parametrize("arch", ["qwen3next", "qwen35", "qwen35moe", "granitehybrid"])
def test_export_hf_refuses_what_it_cannot_write_back(arch, tmp_path, capsys):
    """Families export-hf does not write back (their state-space layers' A = -exp(A_log), which no float32
    A_log gives back exactly for every A): a one-line error that says why, and no folder."""
    import gguf

    path, out = tmp_path / "m.gguf", tmp_path / "hf"
    w = gguf.GGUFWriter(path, arch)
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    code = main(["export-hf", str(path), str(out)])
    assert_failed_cleanly(code, capsys.readouterr().err.strip(), out, "export-hf of", "is not supported", "A_log")


def test_truncated_safetensors(ckpt, tmp_path, capsys):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "model.safetensors", "truncated")


def test_header_length_past_the_end(ckpt, tmp_path, capsys):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "model.safetensors", "corrupt")


def test_missing_tensor(ckpt, tmp_path, capsys):
    _edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_shape(ckpt, tmp_path, capsys):
    def cut(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1].copy()
    _edit_weights(ckpt, cut)
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "k_proj", "shape", "model.safetensors")


def test_nonfinite_weights_fail_unless_allowed(ckpt, tmp_path, capsys):
    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    _edit_weights(ckpt, poison)
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "down_proj", "NaN", "--allow-nonfinite")
    code, err = run_convert(capsys, ckpt, out, "--allow-nonfinite")
    assert code == 0 and out.exists(), err


def test_unknown_tokenizer(ckpt, tmp_path, capsys):
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "tokenizer.json", "pre-tokenizer")


def test_no_tokenizer(ckpt, tmp_path, capsys):
    (ckpt / "tokenizer.json").unlink()
    out = tmp_path / "o.gguf"
    assert_failed_cleanly(*run_convert(capsys, ckpt, out), out, "no tokenizer")


def test_refuses_to_overwrite_without_force(ckpt, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    code, err = run_convert(capsys, ckpt, out)
    assert code != 0 and "--force" in err and out.read_bytes() == b"precious"
    code, err = run_convert(capsys, ckpt, out, "--force")
    assert code == 0 and out.read_bytes()[:4] == b"GGUF"


def test_hub_id_offline_and_not_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "o.gguf"
    code, err = run_convert(capsys, "someone/not-cached-model", out)
    assert code != 0 and "someone/not-cached-model" in err and "cache" in err and not out.exists()


def _hub_cli(args, cache, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run([sys.executable, "-m", "ggufkit", *args], capture_output=True, text=True, env=env)


def test_hub_id_resolves_from_a_prepopulated_cache(good, tmp_path):
    # The layout huggingface-hub keeps: refs/main names a snapshot folder holding the files.
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(good, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "hub.gguf"
    proc = _hub_cli(["convert", "tiny-org/tiny-llama", "-o", str(out)], tmp_path / "hub", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"GGUF"
    proc = _hub_cli(["convert", "tiny-org/absent", "-o", str(tmp_path / "x.gguf")], tmp_path / "hub", tmp_path)
    assert proc.returncode != 0 and "tiny-org/absent" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
