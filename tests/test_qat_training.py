"""ggufkit qat on a tiny Llama whose rows fit the K-quants: the fake quantizer rounds exactly as
convert writes, gradients pass straight through inside the grid only, distillation lowers the
held-out KL divergence, Ctrl-C then --resume continues the very same run, and the command writes a
file holding exactly the trained weights that llama.cpp runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from ggufkit.cli import main

Q = GGMLQuantizationType
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus):
    """A 2-layer Llama of width 256 (K-quant rows) and 40k characters of Pride and Prejudice."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("qat")
    ckpt = tiny_models.numpy_llama(root / "hf", d=256, ff=512)
    text = root / "train.txt"
    text.write_text((corpus / "prideprejudice.txt").read_text(encoding="utf-8")[:40000], encoding="utf-8")
    return ckpt, text


def _plan(ckpt, mixture):
    from ggufkit.convert.checkpoint import open_checkpoint
    from ggufkit.convert.families import family_for
    from ggufkit.convert.pipeline import plan
    from ggufkit.qat.fakequant import quantizers

    c = open_checkpoint(ckpt)
    fam = family_for(c.config, ckpt / "config.json")
    tensors = plan(c, fam, mixture, len(fam.load_vocab(c.root).tokens))
    full = lambda n: c.get_rows(n, 0, c.tensors[n].shape[0])  # noqa: E731
    return c, fam, tensors, quantizers(fam, tensors, {}, full, ckpt), full


@pytest.mark.parametrize("mixture", ["Q4_K_M", "Q2_K", "Q3_K_S", "Q5_1", "IQ4_XS"])
def test_fake_quantization_is_what_convert_writes(tiny, tmp_path, mixture):
    """Weights moved off the checkpoint, rounded by the fake quantizer, equal what convert writes for
    them (dequantized, in GGUF's layout: Llama's q/k rows permuted), bit for bit."""
    from safetensors.numpy import save_file

    from ggufkit.commands.qat import _check_written
    from ggufkit.convert.pipeline import convert

    ckpt, _ = tiny
    _, fam, tensors, fq, full = _plan(ckpt, mixture)
    assert {q.qtype for q in fq.values()} - {Q.F32}, "the mixture quantizes something"
    rng = np.random.default_rng(1)
    moved = {n: full(n) + 0.01 * rng.standard_normal(full(n).shape).astype(np.float32) for n in fq}
    (tmp_path / "hf").mkdir()
    save_file(moved, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / "hf" / f).write_bytes((ckpt / f).read_bytes())
    written = convert(tmp_path / "hf", tmp_path / "out.gguf", out_type=mixture, method="ggml", qat=False)
    rounded = {n: q.round(moved[n])[0] for n, q in fq.items()}
    _check_written(written, fam, tensors, rounded)  # raises on the first tensor that differs
    assert any(not np.array_equal(rounded[n], moved[n]) for n in fq), "rounding changed the weights"
    from ggufkit.errors import GgufkitError

    name = next(n for n, q in fq.items() if q.qtype not in (Q.F32, Q.F16))
    rounded[name] = rounded[name] + np.float32(1e-3)
    with pytest.raises(GgufkitError, match="differs from the trained"):
        _check_written(written, fam, tensors, rounded)


def test_gradient_is_straight_through_inside_the_grid_only():
    """Backward multiplies the incoming gradient by 1 inside the block's grid range and 0 outside."""
    import torch

    from ggufkit.convert.families.base import Family
    from ggufkit.kquants import encode
    from ggufkit.qat.fakequant import TensorQuantizer, _inside_grid, fake_quantize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    for qtype in (Q.Q4_0, Q.Q4_K, Q.Q2_K, Q.IQ4_XS):
        q = encode(x, qtype)
        inside = _inside_grid(x, q, qtype)
        # ggml's scales cover nearly every value (Q4_0 clips the far end opposite a block's extreme)
        assert inside.mean() > 0.98 and inside[1, 7] == 1, qtype.name
        far = x.copy()
        far[1, 7] = 50 * np.abs(x).max()
        moved = _inside_grid(far, q, qtype)
        assert moved[1, 7] == 0 and moved.sum() == inside.sum() - 1, qtype.name
    fq = TensorQuantizer("w", "w", Q.Q4_K, Family.__new__(Family), None, 4)
    w = torch.tensor(x, requires_grad=True)
    g = torch.tensor(rng.standard_normal(x.shape).astype(np.float32))
    fake_quantize(w, fq).backward(g)
    assert torch.equal(w.grad, g * torch.from_numpy(fq.round(x)[1]))


def _settings(**kw):
    from ggufkit.qat.train import Settings

    return Settings(**({"steps": 12, "lr": 1e-3, "seq": 64, "batch": 4, "eval_every": 4, "heldout": 2} | kw))


def test_distillation_lowers_heldout_kl(tiny):
    """At Q2_K, a few steps of distillation lower the KL divergence on windows it never trained on."""
    from ggufkit.qat.train import train, training_windows

    ckpt, text = tiny
    fq = _plan(ckpt, "Q2_K")[3]
    result = train(ckpt, fq, training_windows(ckpt, [text], _settings()), _settings())
    start, best = result.heldout_kl[0][1], dict(result.heldout_kl)[result.best_step]
    assert [s for s, _ in result.heldout_kl] == [0, 4, 8, 12]
    assert result.best_step > 0 and best < 0.9 * start, result.heldout_kl


def test_interrupt_then_resume_is_the_same_run(tiny, tmp_path):
    """Ctrl-C at step 5 saves the state; resuming from it ends where an uninterrupted run ends."""
    from ggufkit.qat.train import STATE_FILE, train, training_windows

    ckpt, text = tiny
    fq = _plan(ckpt, "Q4_K_M")[3]
    windows = training_windows(ckpt, [text], _settings(steps=8))
    whole = train(ckpt, fq, windows, _settings(steps=8))

    def stop(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(ckpt, fq, windows, _settings(steps=8), state_dir=tmp_path, on_step=stop)
    assert (tmp_path / STATE_FILE).is_file()
    resumed = train(ckpt, fq, windows, _settings(steps=8), resume=tmp_path)
    assert resumed.heldout_kl == whole.heldout_kl and resumed.best_step == whole.best_step
    for n, w in whole.weights.items():
        np.testing.assert_array_equal(resumed.weights[n], w, err_msg=n)


def test_qat_command_writes_a_file_llama_cpp_runs(tiny, tmp_path, capsys):
    """The whole command from the error-feedback start in a byte budget: JSON report, file written
    with the start's types (its bytes checked against the trained weights inside the command), loads
    and generates; no state left behind. Started from that file, another run keeps its types."""
    from ggufkit.gguffile.reader import read_header

    ckpt, text = tiny
    out = tmp_path / "q.gguf"
    assert main(["qat", str(ckpt), "-o", str(out), "--type", "Q4_K_M", "--text", str(text), "--steps", "4",
                 "--eval-every", "2", "--seq", "64", "--batch", "2", "--heldout", "2", "--imatrix-chunks", "2",
                 "--lr", "1e-3", "--target-bpw", "3.5", "--json"]) == 0
    types = {t.name: t.type for t in read_header(out).tensors}
    quantized = [t for t in read_header(out).tensors if t.type not in (Q.F32, Q.F16)]
    assert 8 * sum(t.n_bytes for t in quantized) / sum(t.n_elements for t in quantized) <= 3.5
    report = json.loads(capsys.readouterr().out)
    assert report["init"] == "gptq" and [s for s, _ in report["heldout_kl"]] == [0, 2, 4]
    assert report["best_step"] in (0, 2, 4) and report["tokens_per_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]
    assert main(["inspect", str(out)]) == 0
    assert "Q4_K" in capsys.readouterr().out
    assert main(["generate", str(out), "-p", "the", "-n", "4"]) == 0
    capsys.readouterr()
    again = tmp_path / "again.gguf"  # starting from a given file: its weights are step 0's
    assert main(["qat", str(ckpt), "-o", str(again), "--type", "Q4_K_M", "--text", str(text), "--steps", "1",
                 "--seq", "64", "--batch", "2", "--heldout", "2", "--imatrix-chunks", "2", "--init", str(out),
                 "--json"]) == 0
    kl = dict(report["heldout_kl"])[report["best_step"]]
    assert json.loads(capsys.readouterr().out)["heldout_kl"][0][1] == pytest.approx(kl, rel=0.05)
    assert {t.name: t.type for t in read_header(again).tensors} == types


def test_qat_bad_inputs(tiny, tmp_path, capsys):
    import torch

    ckpt, text = tiny
    out = tmp_path / "q.gguf"
    args = ["qat", str(ckpt), "-o", str(out), "--type", "Q4_K_M", "--steps", "2"]
    assert main([*args, "--text", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "missing.txt" in err and "no such training text" in err and len(err.splitlines()) == 1
    assert main([*args, "--text", str(text), "--resume", str(tmp_path / "nostate"), "--imatrix-chunks", "1",
                 "--init", "ggml", "--seq", "64", "--heldout", "1"]) == 1
    assert "no saved qat state" in capsys.readouterr().err
    assert main([*args, "--text", str(text), "--init", str(tmp_path / "nothing.gguf")]) == 1
    assert "neither gptq nor ggml nor a GGUF file" in capsys.readouterr().err
    assert main([*args, "--text", str(text), "--init", "ggml", "--match-size"]) == 1
    assert "chooses the types of the gptq start" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.", encoding="utf-8")
    assert main([*args, "--text", str(short)]) == 1
    err = capsys.readouterr().err.strip()
    assert "short.txt" in err and "windows of 256" in err and len(err.splitlines()) == 1
    short.unlink()
    assert main([*args, "--text", str(text), "--device", "tpu0"]) == 1
    assert "not cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the CPU build CI installs
        assert main([*args, "--text", str(text), "--device", "cuda"]) == 1
        assert "finds no CUDA device" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    out.write_bytes(b"keep")
    assert main([*args, "--text", str(text)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    with pytest.raises(SystemExit):
        main(["qat", str(ckpt), "-o", str(out), "--type", "F16", "--text", str(text)])


def test_shifted_norms_train_and_round_as_stored():
    """Gemma stores its norms as 1 + w: the gradient of such a norm passes whole, and its rounded
    value gives back exactly the value the GGUF stores."""
    from ggufkit.convert.families.base import Family
    from ggufkit.qat.fakequant import TensorQuantizer

    class Shifted(Family):
        def __init__(self):
            pass

        def transform(self, hf_name, x):
            return x + np.float32(1)

        def untransform(self, gguf_name, x):
            return x - np.float32(1)

    w = np.random.default_rng(0).standard_normal(64).astype(np.float32) * 1e-3
    out, mask = TensorQuantizer("n.weight", "blk.0.attn_norm.weight", Q.F32, Shifted(), None, 64).round(w)
    assert mask.all()
    np.testing.assert_array_equal(out + np.float32(1), w + np.float32(1))
