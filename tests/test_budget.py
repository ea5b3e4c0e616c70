"""Mixtures that meet a byte budget (`--target-size`, `--target-bpw`, `--match-size`): the allocator on
a problem solved by hand, budgets met by files that stock llama.cpp loads and runs, and refusals of
budgets no file can meet and of importance matrices of other models."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from ggufkit import budget
from ggufkit.budget import Option, Target, allocate, hull, parse_target
from ggufkit.cli import main
from ggufkit.commands.quantize import _float_rows, quantize_gguf, tensor_metas
from ggufkit.convert.pipeline import convert
from ggufkit.errors import GgufkitError
from ggufkit.gguffile.reader import read_header
from ggufkit.gguffile.split import parse_size
from ggufkit.mixtures import choose_types, model_info
from reference.quantize import fake_imatrix, synthetic_gguf
from tests import tiny_models

Q = gguf.GGMLQuantizationType
# rows of 256 (K-quants fit) and the legacy types' 32-block rows, in one model
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def wide_llama(folder):
    """tiny_models.numpy_llama's checkpoint (its byte-level vocabulary: llama.cpp runs it) widened to
    256 so that K-quants hold its rows; ffn_down's rows are 512."""
    tiny_models.numpy_llama(folder)
    config = json.loads((folder / "config.json").read_text()) | WIDE
    d, ff, n, kv = WIDE["hidden_size"], WIDE["intermediate_size"], config["vocab_size"], 256 // 4 * 2
    shapes = {"model.embed_tokens.weight": (n, d), "model.norm.weight": (d,), "lm_head.weight": (n, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                   p + "mlp.down_proj.weight": (d, ff)}
    rng = np.random.default_rng(1)
    weights = {name: ((1.0 if name.endswith("norm.weight") else 0.0) + 0.08 * rng.standard_normal(shape))
               .astype(np.float32) for name, shape in shapes.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(checkpoint, its F32 GGUF, an imatrix for it)."""
    root = tmp_path_factory.mktemp("wide")
    ckpt = wide_llama(root / "hf")
    f32 = convert(ckpt, root / "f32.gguf", out_type="F32")
    return ckpt, f32, fake_imatrix(f32, root / "imatrix.gguf")


def _generates(path, capfd) -> None:
    assert main(["generate", str(path), "-p", "the", "-n", "4"]) == 0
    assert capfd.readouterr().out.strip()


def test_allocator_finds_the_optimum_of_a_toy_problem():
    """Two tensors, four types each, 60 bytes. By hand: a's losses 8, 3, 1, 0.9 and b's 4, 2, 1.5,
    0.2 at 10..40 bytes; the pairs within 60 bytes are best at a=30 + b=30 (1.0 + 1.5 = 2.5), although
    b's 30-byte type is off its convex hull (greedy on the hulls alone stops at a=40 + b=20, 2.9)."""
    a = [Option(q, c, lo) for q, c, lo in ((Q.Q2_K, 10, 8.0), (Q.Q3_K, 20, 3.0), (Q.Q4_K, 30, 1.0), (Q.Q5_K, 40, 0.9))]
    b = [Option(q, c, lo) for q, c, lo in ((Q.Q2_K, 10, 4.0), (Q.Q3_K, 20, 2.0), (Q.Q4_K, 30, 1.5), (Q.Q5_K, 40, 0.2))]
    assert [o.cost for o in hull(b)] == [10, 20, 40]
    chosen = allocate({"a": a, "b": b}, 60)
    assert (chosen["a"].qtype, chosen["b"].qtype) == (Q.Q4_K, Q.Q4_K)
    # more room: both best types; less: the cheapest of all; no room at all: refused
    assert {o.qtype for o in allocate({"a": a, "b": b}, 80).values()} == {Q.Q5_K}
    assert {o.qtype for o in allocate({"a": a, "b": b}, 29).values()} == {Q.Q2_K}
    assert [o.qtype for o in allocate({"a": a, "b": b}, 30).values()] == [Q.Q3_K, Q.Q2_K]  # 3+4 < 8+2
    with pytest.raises(ValueError):
        allocate({"a": a, "b": b}, 19)


def test_target_parsing():
    assert parse_size("1.2G") == 1_200_000_000 and parse_size("800M") == 800_000_000 and parse_size("512") == 512
    assert parse_target("80M") == Target(size=80_000_000, text="80M")
    assert parse_target(bpw="4.5") == Target(bpw=4.5)
    assert parse_target(match="", mixture="q4_k_m") == Target(match="Q4_K_M")
    assert parse_target() is None
    for kwargs, message in ((dict(size="80Q"), "invalid --target-size '80Q'"),
                            (dict(bpw="-1"), "invalid --target-bpw '-1'"),
                            (dict(match="Q9_K"), "unknown --match-size mixture 'Q9_K'"),
                            (dict(size="80M", bpw=4), "not several")):
        with pytest.raises(GgufkitError, match=message):
            parse_target(**kwargs)


def test_candidates_follow_the_row_fit_rule():
    meta = budget.TensorMeta("blk.0.ffn_down.weight", (320, 64), Q.F32)  # 320: no 256-block
    assert budget.candidates(meta, Q.Q4_K, True) == [Q.IQ4_NL, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16]
    meta = budget.TensorMeta("blk.0.ffn_down.weight", (512, 64), Q.F32)
    assert budget.candidates(meta, Q.Q4_K, True)[:3] == [Q.Q2_K, Q.Q3_K, Q.IQ4_XS]


def test_quantize_meets_the_budget_and_llama_cpp_runs_it(wide, tmp_path, capfd):
    _, f32, imatrix = wide
    q4km = quantize_gguf(f32, tmp_path / "q4km.gguf", "Q4_K_M", imatrix=imatrix).path
    q3km = quantize_gguf(f32, tmp_path / "q3km.gguf", "Q3_K_M", imatrix=imatrix).path
    limit = (q4km.stat().st_size + q3km.stat().st_size) // 2
    out = tmp_path / "budget.gguf"
    assert main(["quantize", str(f32), str(out), "Q4_K_M", "--imatrix", str(imatrix),
                 "--target-size", str(limit)]) == 0
    printed = capfd.readouterr().out
    assert f"budget (--target-size {limit})" in printed and "bits/w" in printed and "ffn_down" in printed
    assert q3km.stat().st_size < out.stat().st_size <= limit
    types = {t.type for t in read_header(out).tensors}
    assert types <= {Q.F32, Q.F16, Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0} and len(types) > 2
    _generates(out, capfd)
    # the same bytes as llama.cpp's Q4_K_M, or fewer, and the budget's file type is the mixture's
    matched = quantize_gguf(f32, tmp_path / "matched.gguf", "Q4_K_M", imatrix=imatrix,
                            target=Target(match="Q4_K_M"))
    assert matched.plan.file_bytes == matched.path.stat().st_size <= q4km.stat().st_size
    assert read_header(matched.path).metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    _generates(matched.path, capfd)
    # bits per weight count tensor data, as `ggufkit inspect` does
    bpw = quantize_gguf(f32, tmp_path / "bpw.gguf", "Q4_K_M", imatrix=imatrix, target=Target(bpw=4.0)).path
    h = read_header(bpw)
    assert 3.9 < 8 * sum(t.n_bytes for t in h.tensors) / sum(t.n_elements for t in h.tensors) <= 4.0


def test_more_bytes_predict_less_loss(wide):
    """Without an imatrix (plain squared error): a larger budget never predicts more loss, and the
    predicted loss of the file matched to Q4_K_M is below that of llama.cpp's Q4_K_M types."""
    _, f32, _ = wide
    header = read_header(f32)
    metas, info = tensor_metas(header), model_info(header.metadata)
    infos = {t.name: t for t in header.tensors}
    rows = lambda n: _float_rows(header, infos[n])  # noqa: E731
    plans = [budget.plan(metas, info, "Q4_K_M", Target(bpw=b), 0, 32, rows, {}) for b in (3.0, 4.0, 5.0)]
    assert plans[0].loss > plans[1].loss > plans[2].loss
    matched = budget.plan(metas, info, "Q4_K_M", Target(match="Q4_K_M"), 0, 32, rows, {})
    llama = choose_types(metas, info, "Q4_K_M")
    llama_loss = sum(next(o.loss for o in matched.options[n] if o.qtype == llama[n]) for n in matched.budgeted)
    assert matched.loss < llama_loss


def test_convert_meets_the_budget(tmp_path, capfd):
    """A checkpoint whose rows (64) fit only the 32-block types: the budget picks among them."""
    ckpt = tiny_models.numpy_llama(tmp_path / "hf")
    q4km = convert(ckpt, tmp_path / "q4km.gguf", out_type="Q4_K_M", qat=False)
    out = tmp_path / "budget.gguf"
    limit = q4km.stat().st_size - 4000
    assert main(["convert", str(ckpt), "-o", str(out), "--type", "Q4_K_M", "--qat", "off",
                 "--target-size", f"{limit / 1000}K"]) == 0
    err = capfd.readouterr().err
    assert "budget (--target-size" in err and "bits/w" in err
    assert out.stat().st_size <= limit
    assert {t.type for t in read_header(out).tensors} <= {Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL,
                                                        Q.Q8_0}
    _generates(out, capfd)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    model = synthetic_gguf(root / "gqa4.gguf")
    other = synthetic_gguf(root / "odd.gguf", n_embd=320, n_head=4, n_head_kv=1, n_ff=640)
    return model, fake_imatrix(model, root / "gqa4.imatrix.gguf"), fake_imatrix(other, root / "odd.imatrix.gguf")


@pytest.mark.parametrize("flags,message", [
    (["--target-size", "100K"], r"--target-size 100K is below the smallest file these types allow: \d+ bytes"),
    (["--target-size", "1G"], "--target-size 1G is above the F16 size of this model"),
    (["--target-bpw", "1.5"], r"--target-bpw 1.5 is below the smallest file these types allow: 2\.\d+ bits/w"),
    (["--target-bpw", "17"], "--target-bpw 17 is above the F16 size of this model"),
    (["--target-size", "2M", "--pure"], "--pure gives every tensor one type; it cannot meet --target-size 2M"),
    (["--target-size", "2M", "--imatrix", "OTHER"], r"odd\.imatrix\.gguf: imatrix does not match this model"),
], ids=["too-small", "too-large", "bpw-too-small", "bpw-too-large", "pure", "other-imatrix"])
def test_bad_budgets(synthetic, tmp_path, capsys, flags, message):
    """One line on stderr naming the value (or the file), exit 1, no output."""
    model, _, other = synthetic
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(model), str(out), "Q4_K_M",
                 *[str(other) if f == "OTHER" else f for f in flags]]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ggufkit quantize: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_one_budget_at_a_time(synthetic, tmp_path, capsys):
    model, _, _ = synthetic
    with pytest.raises(SystemExit):
        main(["quantize", str(model), str(tmp_path / "out.gguf"), "Q4_K_M", "--target-size", "2M",
              "--target-bpw", "4"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_convert_refuses_a_budget_for_float_types(tmp_path, capsys):
    ckpt = tiny_models.numpy_llama(tmp_path / "hf")
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "x.gguf"), "--type", "F16", "--target-size", "1M"]) == 1
    assert "--target-size 1M applies to llama.cpp's mixtures" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_convert_calibrated_meets_the_budget(tmp_path):
    """--calibration's importance matrix (measured through llama.cpp) weighs the budget's errors."""
    from ggufkit.commands.convert import DEFAULT_CALIBRATION, convert_calibrated

    ckpt = wide_llama(tmp_path / "hf")
    text = tmp_path / "text.txt"
    text.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    plans = []
    out = convert_calibrated(ckpt, tmp_path / "out.gguf", "Q4_K_M", [text], ctx=64, chunks=2, threads=2,
                             target=Target(bpw=4.0), plans=plans)
    assert plans[0].used <= plans[0].limit and plans[0].file_bytes == out.stat().st_size
    assert read_header(out).metadata["quantize.imatrix.chunks_count"] == 2
