"""ggufkit perplexity and kld against llama.cpp's own llama-perplexity, on the same file, text,
context and chunks."""

from __future__ import annotations

import json
import re
import subprocess

import gguf
import numpy as np
import pytest

from ggufkit.cli import main
from ggufkit.commands.quantize import quantize_gguf
from reference.llama_cpp import llama_tool

pytestmark = [pytest.mark.slow, pytest.mark.tools, pytest.mark.models]

CTX, CHUNKS, THREADS = 512, 4, "2"


def llama_perplexity(*args) -> str:
    proc = subprocess.run([str(llama_tool("llama-perplexity")), "-t", THREADS, "-c", str(CTX), *map(str, args)],
                          capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def ggufkit_json(capsys, *args) -> dict:
    assert main([*map(str, args), "-t", THREADS, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def dequantize_to_f32(src, dst):
    """The same model with every tensor dequantized to F32, all metadata copied."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def smollm2_dequantized(smollm2_gguf, tmp_path_factory):
    return dequantize_to_f32(smollm2_gguf, tmp_path_factory.mktemp("f32") / "smollm2-dequantized-f32.gguf")


@pytest.fixture(scope="module")
def smollm2_q4_k_m(smollm2_dequantized, tmp_path_factory):
    """A Q4_K_M file: ggufkit's quantizers, llama-quantize's mixture."""
    return quantize_gguf(smollm2_dequantized, tmp_path_factory.mktemp("q4km") / "smollm2-q4_k_m.gguf", "Q4_K_M").path


@pytest.mark.parametrize("model", ["smollm2_gguf", "smollm2_q4_k_m"], ids=["Q4_1", "Q4_K_M"])
def test_perplexity_matches_llama_perplexity(model, corpus, capsys, request):
    model = request.getfixturevalue(model)
    text = corpus / "emma.txt"
    ours = ggufkit_json(capsys, "perplexity", model, "--text", text, "--chunks", CHUNKS)
    log = llama_perplexity("-m", model, "-f", text, "--chunks", CHUNKS)
    ppl, stderr = map(float, re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log).groups())
    assert ours["chunks"] == CHUNKS and ours["tokens"] == CHUNKS * (CTX // 2 - 1)
    assert ours["ppl"] == pytest.approx(ppl, rel=5e-4)
    assert ours["ppl_stderr"] == pytest.approx(stderr, rel=1e-2)


def test_kld_matches_llama_perplexity(smollm2_dequantized, smollm2_q4_k_m, corpus, tmp_path, capsys):
    """F32 base vs Q4_K_M, as the issue asks."""
    text = corpus / "northangerabbey.txt"
    theirs_base, ours_base = tmp_path / "llama.logits", tmp_path / "ggufkit.logits"
    llama_perplexity("-m", smollm2_dequantized, "-f", text, "--chunks", CHUNKS, "--kl-divergence-base", theirs_base)
    log = llama_perplexity("-m", smollm2_q4_k_m, "--kl-divergence-base", theirs_base, "--kl-divergence")
    kld_ref = float(re.search(r"Mean +KLD: +([\d.]+)", log).group(1))
    top_ref = float(re.search(r"Same top p: +([\d.]+)", log).group(1))
    ppl_ref = float(re.search(r"Mean PPL\(Q\) +: +([\d.]+)", log).group(1))
    ppl_base_ref = float(re.search(r"Mean PPL\(base\) +: +([\d.]+)", log).group(1))

    ours = ggufkit_json(capsys, "kld", smollm2_dequantized, smollm2_q4_k_m, "--text", text, "--chunks", CHUNKS,
                        "--save-base", ours_base)
    assert ours["kld_mean"] == pytest.approx(kld_ref, rel=0.02)
    assert 100 * ours["top1_agreement"] == pytest.approx(top_ref, abs=0.2)
    assert ours["ppl_model"] == pytest.approx(ppl_ref, rel=5e-4)
    assert ours["ppl_base"] == pytest.approx(ppl_base_ref, rel=5e-4)
    # Same file format: identical header and tokens, same size.
    n_head = 20 + 4 * CHUNKS * CTX
    assert ours_base.read_bytes()[:n_head] == theirs_base.read_bytes()[:n_head]
    assert ours_base.stat().st_size == theirs_base.stat().st_size

    # And llama.cpp's own base file is read as is.
    reused = ggufkit_json(capsys, "kld", smollm2_q4_k_m, "--base-logits", theirs_base)
    assert reused["kld_mean"] == pytest.approx(kld_ref, rel=0.02)
    assert 100 * reused["top1_agreement"] == pytest.approx(top_ref, abs=0.2)
