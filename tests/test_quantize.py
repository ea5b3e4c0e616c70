"""`ggufkit quantize` against llama-quantize: the type of every tensor for every mixture (real and
synthetic models, with and without an imatrix, with overrides), the bytes and metadata of whole
files where ggufkit.kquants has the types, and refusals of bad input."""

from __future__ import annotations

import contextlib
import itertools
import shutil

import gguf
import numpy as np
import pytest

from ggufkit.cli import main
from ggufkit.commands.convert import DEFAULT_CALIBRATION, convert_calibrated
from ggufkit.commands.quantize import quantize_gguf
from ggufkit.convert.pipeline import convert
from ggufkit.errors import GgufkitError
from ggufkit.gguffile.reader import read_header
from ggufkit.kquants import supported_types
from ggufkit.mixtures import Options, parse_override, parse_qtype, requires_imatrix
from ggufkit.runtime.load import load
from reference.quantize import (ALL_MIXTURES, dequantized_gguf, fake_imatrix, ggufkit_types, identical_tensors,
                               llama_quantize, metadata, needed_types, reference_types, synthetic_gguf)
from tests import tiny_models

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="session")
def gemma3_f32(gemma3_hf, tmp_path_factory):
    return convert(gemma3_hf, tmp_path_factory.mktemp("gguf") / "gemma3-f32.gguf", out_type="F32")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """name -> (F32 GGUF, an imatrix for it)."""
    root = tmp_path_factory.mktemp("synthetic")
    models = {"gqa4": dict(), "moe8": dict(n_expert=8, n_ff=256), "tied-gqa1": dict(n_head_kv=8, tied=True),
              "odd-rows": dict(n_embd=320, n_head=4, n_head_kv=1, n_ff=640)}
    return {name: (synthetic_gguf(root / f"{name}.gguf", **kw), fake_imatrix(root / f"{name}.gguf",
                                                                            root / f"{name}.imatrix.gguf"))
            for name, kw in models.items()}


def _assert_same_types(model, mixture, imatrix=None, opts=None, flags=()):
    im_flags = ("--imatrix", str(imatrix)) if imatrix else ()
    ref = reference_types(model, mixture, *im_flags, *flags)
    ours = ggufkit_types(model, mixture, has_imatrix=imatrix is not None, opts=opts)
    assert ours.keys() == ref.keys()
    assert {n: t.name for n, t in ours.items() if ref[n] != t} == {}, \
        f"{mixture}: llama-quantize chose {({n: ref[n].name for n in ours if ref[n] != ours[n]})}"


@pytest.mark.tools
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("mixture", ALL_MIXTURES)
@pytest.mark.parametrize("model", ["gqa4", "moe8", "tied-gqa1", "odd-rows"])
def test_mixture_types_synthetic(synthetic, model, mixture, with_imatrix):
    path, imatrix = synthetic[model]
    _assert_same_types(path, mixture, imatrix if with_imatrix else None)


@pytest.mark.tools
@pytest.mark.parametrize("flags", [
    ("--tensor-type", "attn_v=q8_0", "--tensor-type", "blk\\.[0-3]\\.ffn_down=Q3_K"),
    ("--tensor-type", "BLK\\.1\\.ATTN_V=q4_k"),  # llama-quantize lower-cases the pattern
    ("--output-tensor-type", "q5_k", "--token-embedding-type", "q8_0"),
    ("--output-tensor-type", "f16"),
    ("--pure",),
    ("--pure", "--tensor-type", "ffn_up=q6_k"),
], ids=["tensor-type", "tensor-type-case", "output+embd", "output-f16", "pure", "pure+tensor-type"])
@pytest.mark.parametrize("model", ["gqa4", "tied-gqa1", "odd-rows"])
def test_overrides_match_llama_quantize(synthetic, model, flags):
    path, _ = synthetic[model]
    args = list(flags)
    opts = Options(pure="--pure" in args)
    for flag, value in zip(args, args[1:] + [""]):
        if flag == "--tensor-type":
            opts.overrides.append(parse_override(value))
        elif flag == "--output-tensor-type":
            opts.output_type = parse_qtype(value)
        elif flag == "--token-embedding-type":
            opts.token_embd_type = parse_qtype(value)
    for mixture in ("Q4_K_M", "Q3_K_M", "Q4_0"):
        _assert_same_types(path, mixture, opts=opts, flags=flags)


@pytest.fixture(scope="module")
def real_models(smollm2_f32, gemma3_f32, tmp_path_factory):
    root = tmp_path_factory.mktemp("imatrices")
    return {"smollm2": (smollm2_f32, fake_imatrix(smollm2_f32, root / "smollm2.imatrix.gguf")),
            "gemma3": (gemma3_f32, fake_imatrix(gemma3_f32, root / "gemma3.imatrix.gguf"))}


@pytest.mark.slow
@pytest.mark.tools
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_mixture_types_real_models(real_models, model, with_imatrix):
    path, imatrix = real_models[model]
    for mixture in ALL_MIXTURES:
        _assert_same_types(path, mixture, imatrix if with_imatrix else None)


def _skip_unless_supported(model, mixture, imatrix):
    missing = needed_types(ggufkit_types(model, mixture, has_imatrix=imatrix is not None)) - set(supported_types())
    if missing:
        pytest.skip(f"ggufkit.kquants has no {', '.join(sorted(t.name for t in missing))} yet")


def _assert_identical_to_llama_quantize(tmp_path, model, mixture, imatrix=None):
    _skip_unless_supported(model, mixture, imatrix)
    im_flags = ("--imatrix", str(imatrix)) if imatrix else ()
    ref = tmp_path / "ref.gguf"
    llama_quantize(model, ref, mixture, *im_flags)
    ours = quantize_gguf(model, tmp_path / "ours.gguf", mixture, imatrix=imatrix).path
    fraction, differ = identical_tensors(ours, ref)
    assert differ == [], f"{mixture}: {len(differ)} tensors differ ({fraction:.1%} identical), e.g. {differ[:3]}"
    assert metadata(ours) == metadata(ref)
    return ours


@pytest.mark.slow
@pytest.mark.tools
@pytest.mark.parametrize("mixture,with_imatrix", [("Q8_0", False), ("Q4_0", True), ("Q4_K_M", True),
                                                  ("IQ4_XS", True), ("TQ1_0", True)])
def test_bytes_and_metadata_match_llama_quantize_smollm2(real_models, tmp_path, mixture, with_imatrix):
    path, imatrix = real_models["smollm2"]
    _assert_identical_to_llama_quantize(tmp_path, path, mixture, imatrix if with_imatrix else None)


@pytest.mark.tools
@pytest.mark.parametrize("mixture", ["Q4_K_M", "Q3_K_S", "Q5_1", "IQ4_NL", "TQ1_0", "TQ2_0", "MXFP4_MOE", "IQ3_M",
                                     "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XXS", "IQ1_M", "IQ1_S"])
def test_bytes_match_llama_quantize_synthetic(synthetic, tmp_path, mixture):
    path, imatrix = synthetic["moe8"]  # per-expert imatrix slices, 3-D tensors, 256-multiple rows
    _assert_identical_to_llama_quantize(tmp_path, path, mixture, imatrix)


@pytest.fixture(scope="module")
def runnable(tmp_path_factory):
    """F32 GGUFs llama.cpp runs, every row a multiple of 256: numpy_llama's, and moe8's layout in 2
    layers with that vocabulary and norms about 1 (so that the experts shape the logits). Weights
    small enough, and layers few enough, that rounding the activations barely moves the logits."""
    root = tmp_path_factory.mktemp("runnable")
    llama = convert(tiny_models.numpy_llama(root / "hf", d=256, ff=512, std=0.05), root / "llama.gguf",
                    out_type="F32")
    moe = synthetic_gguf(root / "moe.gguf", n_layer=2, n_expert=8, n_ff=256, vocab=llama, norm=1.0)
    return {"llama": (llama, fake_imatrix(llama, root / "llama.imatrix.gguf")),
            "moe": (moe, fake_imatrix(moe, root / "moe.imatrix.gguf"))}


def _run(path, tokens: list[int], n: int = 0) -> tuple[list[int], np.ndarray]:
    """llama-cpp-python on `tokens`: its greedy continuation of n more (each decoded on its own, on
    the KV cache of those before) and the logits at every position it decoded."""
    with contextlib.closing(load(path, n_ctx=64, threads=2, logits_all=True)) as llm:
        if n:
            new = list(itertools.islice(llm.generate(tokens, temp=0.0), n))
        else:
            llm.eval(tokens)
            new = []
        return new, np.array(llm.scores[:llm.n_tokens])


LOW_BIT = ["IQ3_M", "IQ3_XS", "IQ3_S", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
           "TQ2_0", "TQ1_0", "MXFP4_MOE"]


@pytest.mark.tools
@pytest.mark.parametrize("mixture", LOW_BIT)
def test_low_bit_files_run_in_llama_cpp(runnable, tmp_path, mixture):
    """Each sub-4-bit mixture's file, the bytes llama-quantize writes (with an imatrix only where the
    mixture needs one), loads in llama-cpp-python and generates; its logits are finite and those of
    its own weights run in float (dequantized by gguf-py): llama.cpp decodes what was meant. Per
    position they differ as llama.cpp rounds a quantized matmul's inputs to 8 bits, by a median 1.5-2.5%
    of the logits' spread here (more where that flips an expert choice, hence the median), where these
    mixtures' rounding of the weights moves them by 16% (MXFP4) to 130% (TQ1_0) from the F32 model's."""
    model, imatrix = runnable["moe" if mixture == "MXFP4_MOE" else "llama"]
    needs = any(requires_imatrix(n, q, mixture) for n, q in ggufkit_types(model, mixture).items())
    ours = _assert_identical_to_llama_quantize(tmp_path, model, mixture, imatrix if needs else None)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, 12)]
    tokens, logits = _run(ours, prompt, 8)
    assert len(tokens) == 8 and np.isfinite(logits).all()
    _, exact = _run(dequantized_gguf(ours, tmp_path / "dequantized.gguf"), prompt + tokens[:-1])
    assert logits.shape == exact.shape == (len(prompt) + 7, exact.shape[1])  # the same positions
    moved = float(np.median(np.sqrt(np.mean((logits - exact) ** 2, axis=1))) / exact.std())
    assert moved < 0.05, f"{mixture}: logits differ from the dequantized weights' by {moved:.3f} x their spread"


@pytest.mark.slow
@pytest.mark.tools
def test_convert_mixture_in_one_pass_matches_llama_quantize(smollm2_hf, real_models, tmp_path):
    """checkpoint -> Q4_K_M with an imatrix, in one convert: the bytes llama-quantize makes from our F32 file."""
    path, imatrix = real_models["smollm2"]
    ours = convert(smollm2_hf, tmp_path / "ours.gguf", out_type="Q4_K_M", imatrix=imatrix)
    ref = tmp_path / "ref.gguf"
    llama_quantize(path, ref, "Q4_K_M", "--imatrix", str(imatrix))
    fraction, differ = identical_tensors(ours, ref)
    assert differ == [], f"{len(differ)} tensors differ ({fraction:.1%} identical), e.g. {differ[:3]}"
    keys = ("general.file_type", "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count")
    assert {k: v for k, v in metadata(ours)["kv"].items() if k in keys} == \
        {k: v for k, v in metadata(ref)["kv"].items() if k in keys}


@pytest.mark.torch
def test_convert_with_calibration(smollm2_hf, tmp_path, capsys):
    """--calibration with no file measures on the shipped text; the imatrix reaches the quantizer."""
    ckpt = tiny_models.build("llama", tmp_path / "hf", smollm2_hf)
    out = tmp_path / "q4km.gguf"
    assert main(["convert", str(ckpt), "-o", str(out), "--type", "q4_k_m", "--calibration",
                 "--calibration-chunks", "2", "--calibration-ctx", "64"]) == 0
    captured = capsys.readouterr()
    assert "bits/w" in captured.err and captured.out.strip() == str(out)
    r = gguf.GGUFReader(out)
    assert r.fields["quantize.imatrix.chunks_count"].contents() == 2
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder removed
    plain = convert(ckpt, tmp_path / "plain.gguf", out_type="Q4_K_M")
    assert identical_tensors(out, plain)[1], "the imatrix changed no tensor"


def test_calibrated_model_names_its_text_not_where_it_lay(tmp_path):
    """quantize.imatrix.dataset is the calibration text's file name, not its path on this machine."""
    ckpt = tiny_models.numpy_llama(tmp_path / "hf")
    text = tmp_path / "texts" / "mine.txt"
    text.parent.mkdir()
    text.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    for texts, name in (((), "calibration.txt"), ((text,), "mine.txt")):
        out = convert_calibrated(ckpt, tmp_path / f"{name}.gguf", "Q4_0", texts, ctx=64, chunks=2, threads=2)
        assert read_header(out).metadata["quantize.imatrix.dataset"] == name


def test_convert_refuses_an_imatrix_for_float_types(smollm2_hf, synthetic, tmp_path):
    with pytest.raises(GgufkitError, match="importance matrix applies to llama.cpp's mixtures"):
        convert(smollm2_hf, tmp_path / "x.gguf", out_type="F16", imatrix=synthetic["gqa4"][1])
    with pytest.raises(GgufkitError, match="needs an importance matrix"):
        convert(smollm2_hf, tmp_path / "x.gguf", out_type="Q2_K_S")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.tools
def test_requantize(synthetic, tmp_path):
    path, _ = synthetic["gqa4"]
    q4 = quantize_gguf(path, tmp_path / "q4_0.gguf", "Q4_0").path
    with pytest.raises(GgufkitError, match="already quantized.*--allow-requantize"):
        quantize_gguf(q4, tmp_path / "q8.gguf", "Q8_0")
    ours = quantize_gguf(q4, tmp_path / "q8.gguf", "Q8_0", allow_requantize=True).path
    ref = tmp_path / "ref.gguf"
    llama_quantize(q4, ref, "Q8_0", "--allow-requantize")
    assert identical_tensors(ours, ref)[1] == []


def test_imatrix_from_another_model(synthetic, tmp_path):
    path, _ = synthetic["gqa4"]
    _, other = synthetic["odd-rows"]  # same tensor names, other row lengths
    with pytest.raises(GgufkitError, match=r"imatrix does not match this model: blk\.0\.\S+ \(imatrix has 320"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q4_0", imatrix=other)
    _, moe = synthetic["moe8"]  # no ffn_down/gate/up entries, only ffn_*_exps
    with pytest.raises(GgufkitError, match=r"blk\.0\.ffn_down\.weight \(no entry\)"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q4_0", imatrix=moe)
    result = quantize_gguf(path, tmp_path / "out.gguf", "Q4_0", imatrix=moe, allow_missing=True)
    assert len(result.without_imatrix) == 3 * 8 and "blk.7.ffn_up.weight" in result.without_imatrix


def test_bad_input(synthetic, tmp_path):
    path, imatrix = synthetic["gqa4"]
    (tmp_path / "not.gguf").write_bytes(b"hello world, not a gguf")
    with pytest.raises(GgufkitError, match="not a GGUF file"):
        quantize_gguf(tmp_path / "not.gguf", tmp_path / "out.gguf", "Q4_0")
    with pytest.raises(GgufkitError, match="unknown quantization type 'Q4_K_X'"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q4_K_X")
    with pytest.raises(GgufkitError, match="malformed --tensor-type"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q4_0", tensor_types=["attn_v"])
    with pytest.raises(GgufkitError, match="invalid --tensor-type type 'q9'"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q4_0", tensor_types=["attn_v=q9"])
    # very low-bit types are refused without importance data, as llama-quantize refuses them
    with pytest.raises(GgufkitError, match="IQ2_XXS for 'blk.0.ffn_down.weight' requires an importance matrix"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q4_0", tensor_types=["ffn_down=iq2_xxs"])
    with pytest.raises(GgufkitError, match="Q2_K for .* requires an importance matrix"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q2_K_S")
    with pytest.raises(GgufkitError, match="no such imatrix file"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q4_0", imatrix=tmp_path / "missing.gguf")
    with pytest.raises(GgufkitError, match="not an imatrix: missing metadata"):
        quantize_gguf(path, tmp_path / "out.gguf", "Q4_0", imatrix=path)
    shutil.copy(path, tmp_path / "exists.gguf")
    with pytest.raises(GgufkitError, match="already exists"):
        quantize_gguf(path, tmp_path / "exists.gguf", "Q4_0")
    assert not (tmp_path / "out.gguf").exists()


def test_cli(synthetic, tmp_path, capsys):
    path, imatrix = synthetic["moe8"]
    assert main(["quantize", str(path), str(tmp_path / "out.gguf"), "q4_0", "--imatrix", str(imatrix)]) == 0
    table = capsys.readouterr().out
    assert "Q4_0" in table and "bits/w" in table and "out.gguf" in table
    assert main(["quantize", str(path), str(tmp_path / "out.gguf"), "q4_0"]) == 1
    assert "already exists" in capsys.readouterr().err
