"""Importance matrices: the GGUF and legacy .dat formats, `ggufkit imatrix` against llama-imatrix
on the same F32 GGUF and text (SmolLM2, and a tiny mixture of experts, whose per-expert sums are also
checked against transformers' own routing), and each tool's imatrix fed to the other's quantizer."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ggufkit.cli import main
from ggufkit.commands.quantize import quantize_gguf
from ggufkit.errors import GgufkitError
from ggufkit.gguffile.imatrix import read_imatrix, write_imatrix
from ggufkit.gguffile.reader import read_header
from ggufkit.runtime.imatrix import collect
from ggufkit.runtime.perplexity import read_text
from reference.quantize import (fake_imatrix, identical_tensors, llama_imatrix, llama_quantize, metadata,
                               synthetic_gguf)

CTX, CHUNKS = 128, 3  # small windows keep the real-model runs short on 2 cores


def _write_dat(path, entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str):
    """The legacy format as llama-imatrix --output-format dat writes it."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    path.write_bytes(out + struct.pack("<ii", chunks, len(dataset)) + dataset.encode())
    return path


def test_gguf_roundtrip_and_weights(tmp_path):
    model = synthetic_gguf(tmp_path / "m.gguf", n_layer=2, n_expert=8, n_ff=256)
    im = read_imatrix(fake_imatrix(model, tmp_path / "a.gguf"))
    im.entries["blk.0.ffn_up_exps.weight"].counts[3] = 0  # an expert no token was routed to
    again = read_imatrix(write_imatrix(im, tmp_path / "b.gguf"))
    assert again.entries.keys() == im.entries.keys() and again.datasets == ["synthetic"]
    for name, e in im.entries.items():
        np.testing.assert_array_equal(again.entries[name].sums, e.sums)
        np.testing.assert_array_equal(again.entries[name].counts, e.counts)
    w = again.weights("blk.0.ffn_up_exps.weight").reshape(8, -1)
    e = im.entries["blk.0.ffn_up_exps.weight"]
    np.testing.assert_array_equal(w[0], e.sums[0] / np.float32(512))
    assert (w[3] == 1).all()  # llama-quantize's value for experts without data


def test_legacy_dat(tmp_path):
    values = np.array([2.0, 4.0, 6.0], dtype=np.float32)
    im = read_imatrix(_write_dat(tmp_path / "i.dat", {"blk.0.attn_q.weight": (4, values)}, 7, "wiki.txt"))
    assert im.legacy and im.chunk_count == 7 and im.datasets == ["wiki.txt"]
    np.testing.assert_array_equal(im.weights("blk.0.attn_q.weight"), values / 4)


@pytest.mark.parametrize("data,match", [(b"\x00\x00\x00\x00", "no entries"), (b"\x02\x00\x00\x00\x05", "truncated"),
                                        (b"GGUF" + b"\x00" * 8, "unsupported GGUF version 0")])
def test_bad_imatrix_files(tmp_path, data, match):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(GgufkitError, match=match):
        read_imatrix(tmp_path / "bad")


@pytest.mark.tools
def test_legacy_dat_in_quantize_matches_llama_quantize(tmp_path):
    model = synthetic_gguf(tmp_path / "m.gguf", n_layer=2)
    gguf_im = read_imatrix(fake_imatrix(model, tmp_path / "i.gguf"))
    dat = _write_dat(tmp_path / "i.dat", {n: (3, e.sums[0] / 512 * 3) for n, e in gguf_im.entries.items()}, 1, "x")
    ref = tmp_path / "ref.gguf"
    llama_quantize(model, ref, "Q4_0", "--imatrix", str(dat))
    ours = quantize_gguf(model, tmp_path / "ours.gguf", "Q4_0", imatrix=dat).path
    assert identical_tensors(ours, ref)[1] == []
    assert metadata(ours) == metadata(ref)


def _both_imatrices(model, text, root):
    """(ours, llama-imatrix's) paths for `model` over the same text, windows and chunk count."""
    ref = llama_imatrix(model, text, root / "ref.gguf", CTX, CHUNKS)
    ours = root / "ours.gguf"
    assert main(["imatrix", str(model), "--text", str(text), "-o", str(ours), "--ctx", str(CTX),
                 "--chunks", str(CHUNKS), "--threads", "2"]) == 0
    return ours, ref


def _assert_same_imatrix(ours, ref):
    assert ours.entries.keys() == ref.entries.keys()
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (ref.chunk_count, ref.chunk_size, ref.datasets)
    for name, r in ref.entries.items():
        o = ours.entries[name]
        np.testing.assert_array_equal(o.counts, r.counts, err_msg=name)
        np.testing.assert_allclose(o.sums, r.sums, rtol=1e-3, err_msg=name)


@pytest.fixture(scope="module")
def both_imatrices(smollm2_f32, corpus, tmp_path_factory):
    """llama-imatrix's and ours on SmolLM2 F32."""
    return _both_imatrices(smollm2_f32, corpus / "prideprejudice.txt", tmp_path_factory.mktemp("imatrix"))


@pytest.mark.slow
@pytest.mark.tools
def test_matches_llama_imatrix(both_imatrices):
    _assert_same_imatrix(*(read_imatrix(p) for p in both_imatrices))


@pytest.mark.slow
@pytest.mark.tools
def test_each_tools_imatrix_works_in_the_other(both_imatrices, smollm2_f32, tmp_path):
    ours, ref = both_imatrices
    llama_quantize(smollm2_f32, tmp_path / "llama-with-ours.gguf", "Q4_0", "--imatrix", str(ours))
    out = quantize_gguf(smollm2_f32, tmp_path / "ours-with-llama.gguf", "Q4_0", imatrix=ref).path
    llama_quantize(smollm2_f32, tmp_path / "llama-with-llama.gguf", "Q4_0", "--imatrix", str(ref))
    assert identical_tensors(out, tmp_path / "llama-with-llama.gguf")[1] == []


# 256 experts, 2 per token: over CHUNKS windows of CTX tokens (3 tokens an expert) a few in each layer get none
MOE = dict(num_experts=256, num_experts_per_tok=2, moe_intermediate_size=16, tie_word_embeddings=True)
MOE_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def _without_attention_output(ckpt):
    """The checkpoint with attention's output projections at zero. llama.cpp's attention on the CPU
    rounds K, V and its running sums to F16, enough to flip the router's near-ties against
    transformers' float32 now and then; without attention's output both compute every expert input
    in float32, so both route every token alike."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(ckpt / "model.safetensors")
    for name, w in weights.items():
        if name.endswith("self_attn.o_proj.weight"):
            weights[name] = np.zeros_like(w)
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


@pytest.fixture(scope="module")
def moe(corpus, tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint built by transformers (with Qwen2's vocabulary, which adds no BOS;
    attention's output at zero), its F32 GGUF, and ours and llama-imatrix's imatrices of it."""
    from ggufkit.convert.pipeline import convert
    from tests import tiny_models

    root = tmp_path_factory.mktemp("moe")
    kv = tiny_models.llama_cpp_vocab("qwen2", root / "vocab")
    ckpt = _without_attention_output(tiny_models.build("qwen3moe", root / "hf", root / "vocab",
                                                       vocab_size=len(kv["tokenizer.ggml.tokens"]), **MOE))
    model = convert(ckpt, root / "f32.gguf", out_type="F32")
    assert read_header(model).metadata["tokenizer.ggml.add_bos_token"] is False
    ours, ref = _both_imatrices(model, corpus / "prideprejudice.txt", root)
    return ckpt, read_imatrix(ours), read_imatrix(ref)


def _transformers_expert_sums(ckpt, text) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (sums of x^2 per expert, tokens per expert) of the expert tensors, from transformers'
    forward pass over the first CHUNKS windows of CTX tokens: each token's input to the MoE block goes
    to the experts its router picked (gate and up), and act(gate) * up of each of them to down."""
    import torch
    import transformers

    tokens = transformers.AutoTokenizer.from_pretrained(ckpt)(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(tokens[:CHUNKS * CTX]).reshape(CHUNKS, CTX)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    routed = {}  # layer -> [(hidden states, the router's top-k expert ids)] per window

    def keep(i):
        return lambda router, args, out: routed.setdefault(i, []).append((args[0], out[2]))

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(keep(i))
    with torch.no_grad():
        for window in windows:
            model(window[None])
        out = {}
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            x, top = (torch.cat(parts) for parts in zip(*routed[i]))
            sums = {t: np.zeros((experts.num_experts, n), np.float64)
                    for t, n in zip(MOE_TENSORS, (x.shape[1], x.shape[1], experts.intermediate_dim))}
            counts = np.zeros(experts.num_experts, np.float32)
            for e in range(experts.num_experts):
                xe = x[(top == e).any(dim=1)]
                gate, up = torch.nn.functional.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
                for t, rows in zip(MOE_TENSORS, (xe, xe, experts.act_fn(gate) * up)):
                    sums[t][e] = (rows.double() ** 2).sum(dim=0).numpy()
                counts[e] = len(xe)
            out |= {f"blk.{i}.{t}.weight": (sums[t], counts) for t in MOE_TENSORS}
    return out


@pytest.mark.tools
@pytest.mark.torch
@pytest.mark.ggml
def test_moe_experts_match_llama_imatrix(moe):
    """Per-expert sums and counts as llama-imatrix writes them, experts that got no token at zero."""
    _, ours, ref = moe
    _assert_same_imatrix(ours, ref)
    experts = [ours.entries[f"blk.{i}.{t}.weight"] for i in range(2) for t in MOE_TENSORS]
    assert all(e.counts.shape == (MOE["num_experts"],) and (e.counts == 0).any() for e in experts)


@pytest.mark.tools
@pytest.mark.torch
@pytest.mark.ggml
def test_moe_experts_match_transformers_routing(moe, corpus):
    """The same sums and counts from transformers' own forward pass and routing."""
    ckpt, ours, _ = moe
    want = _transformers_expert_sums(ckpt, read_text(corpus / "prideprejudice.txt").decode())
    assert want.keys() <= ours.entries.keys()
    for name, (sums, counts) in want.items():
        got = ours.entries[name]
        np.testing.assert_array_equal(got.counts, counts, err_msg=name)
        # an activation that cancels to near zero keeps only float32's absolute precision: a floor
        np.testing.assert_allclose(got.sums, sums, rtol=1e-3, atol=1e-6 * sums.max(), err_msg=name)
        assert (got.sums[counts == 0] == 0).all(), name


@pytest.mark.slow
def test_text_too_short(smollm2_f32, tmp_path):
    (tmp_path / "short.txt").write_text("Too short for two windows.")
    with pytest.raises(GgufkitError, match="text too short"):
        collect(smollm2_f32, [tmp_path / "short.txt"], ctx=CTX)


def test_bad_model(tmp_path, corpus):
    (tmp_path / "m.gguf").write_bytes(b"not a model")
    assert main(["imatrix", str(tmp_path / "m.gguf"), "--text", str(corpus / "emma.txt"),
                 "-o", str(tmp_path / "i.gguf")]) == 1
    assert not (tmp_path / "i.gguf").exists()


@pytest.mark.parametrize("order,last", [
    (["blk.0.attn_q.weight", "blk.0.ffn_down.weight"], "blk.0.ffn_down.weight"),
    (["a", "b", "c"] * 2, "c"),  # two physical batches per window: stop at the end of each graph
    (["a", "c", "b", "c"], None),  # graphs that differ: never stop early
    (["a", "b", "b"], None),  # the last weight used twice in a graph
    ([], None),  # no collected weight (windows under 16 tokens)
])
@pytest.mark.ggml
def test_early_stop_only_after_the_graphs_last_weight(order, last):
    from ggufkit.runtime.imatrix import Collector

    c = Collector(process_output=False)
    c._order = list(order)
    c.window_done()
    assert c.last == last and c._order is None


def test_windows_callback_gives_the_matrix_of_the_first_n_windows(tmp_path, corpus):
    """One pass read off at 1 and 2 windows equals separate runs over 1 and 2 windows."""
    from ggufkit.convert.pipeline import convert
    from tests import tiny_models

    model = convert(tiny_models.numpy_llama(tmp_path / "hf"), tmp_path / "tiny.gguf", out_type="F32")
    text = corpus / "prideprejudice.txt"
    seen = []
    whole = collect(model, [text], ctx=64, chunks=3, threads=2, on_windows=((1, 2), seen.append))
    assert [m.chunk_count for m in seen] == [1, 2] and whole.chunk_count == 3
    for got in seen:
        want = collect(model, [text], ctx=64, chunks=got.chunk_count, threads=2)
        assert got.entries.keys() == want.entries.keys()
        for name, entry in want.entries.items():
            np.testing.assert_array_equal(got.entries[name].sums, entry.sums)
            np.testing.assert_array_equal(got.entries[name].counts, entry.counts)


@pytest.mark.tools
@pytest.mark.torch
@pytest.mark.ggml
@pytest.mark.parametrize("family", ["lfm2", "granite_hybrid"])
def test_hybrid_layers_match_llama_imatrix(family, smollm2_hf, corpus, tmp_path):
    """Short-convolution (LFM2) and Mamba-2 (Granite 4.0 hybrid) layers beside attention: the weights
    llama-imatrix collects (the state-space projections, experts included), with its sums and counts."""
    from ggufkit.convert.pipeline import convert
    from tests import tiny_models

    tokenizer, overrides = tiny_models.tokenizer_for(family, smollm2_hf, tmp_path / "vocab")
    model = convert(tiny_models.build(family, tmp_path / "hf", tokenizer, **overrides), tmp_path / "f32.gguf",
                    out_type="F32")
    ours, ref = (read_imatrix(p) for p in _both_imatrices(model, corpus / "prideprejudice.txt", tmp_path))
    _assert_same_imatrix(ours, ref)
    kinds = {name.split(".")[2] for name in ref.entries}
    assert kinds & {"shortconv", "ssm_in", "ssm_out"}, kinds
