"""ggufkit.runtime: bad inputs, inspect, the base-logits codes, and quick real-model runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ggufkit.cli import main
from ggufkit.runtime import describe, inspect
from ggufkit.gguffile.reader import read_header
from ggufkit.runtime.kld import LOG_PROB_RANGE, KldStats, quantize_log_probs, row_width
from ggufkit.runtime.load import Session, check_model


@pytest.fixture(scope="module")
def truncated_gguf(smollm2_gguf, tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(smollm2_gguf.stat().st_size // 2))
    return path


@pytest.fixture(scope="module")
def header_only_gguf(smollm2_gguf, tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "header-cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(4096))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err


# argv of each command given a bad MODEL, a good GGUF (kld's base) and a text
COMMANDS = {
    "perplexity": lambda bad, good, text: ["perplexity", bad, "--text", text],
    "kld": lambda bad, good, text: ["kld", good, bad, "--text", text],
    "bench": lambda bad, good, text: ["bench", bad, "-r", "1"],
    "inspect": lambda bad, good, text: ["inspect", bad],
    "generate": lambda bad, good, text: ["generate", bad, "-p", "hi"],
    "chat": lambda bad, good, text: ["chat", bad],
    "serve": lambda bad, good, text: ["serve", bad],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_file(command, tmp_path, capsys, corpus, smollm2_gguf):
    missing = tmp_path / "missing.gguf"
    rc, _, err = run_cli(capsys, *COMMANDS[command](missing, smollm2_gguf, corpus / "emma.txt"))
    assert_one_line_error(rc, err, "missing.gguf", "no such file")


@pytest.mark.parametrize("command", COMMANDS)
def test_not_a_gguf(command, tmp_path, capsys, corpus, smollm2_gguf):
    rc, _, err = run_cli(capsys, *COMMANDS[command](corpus / "emma.txt", smollm2_gguf, corpus / "emma.txt"))
    assert_one_line_error(rc, err, "not a GGUF file")


@pytest.mark.parametrize("command", COMMANDS)
def test_truncated_gguf(command, truncated_gguf, capsys, corpus, smollm2_gguf):
    rc, _, err = run_cli(capsys, *COMMANDS[command](truncated_gguf, smollm2_gguf, corpus / "emma.txt"))
    assert_one_line_error(rc, err, "truncated GGUF")


@pytest.fixture(scope="module")
def unknown_arch_gguf(smollm2_gguf, tmp_path_factory):
    """A valid GGUF whose architecture llama.cpp does not know: only llama.cpp can refuse it."""
    data = bytearray(smollm2_gguf.read_bytes())
    at = data.index(b"general.architecture") + len(b"general.architecture") + 4 + 8  # type, length
    data[at:at + 5] = b"llamz"
    path = tmp_path_factory.mktemp("bad") / "unknown-arch.gguf"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("command", ["perplexity", "generate", "bench"])
def test_unknown_architecture(command, unknown_arch_gguf, capfd, corpus, smollm2_gguf):
    rc = main([str(a) for a in COMMANDS[command](unknown_arch_gguf, smollm2_gguf, corpus / "emma.txt")])
    assert_one_line_error(rc, capfd.readouterr().err, "unknown model architecture: 'llamz'")


def test_gguf_cut_inside_header(header_only_gguf, capsys):
    rc, _, err = run_cli(capsys, "inspect", header_only_gguf)
    assert_one_line_error(rc, err, "truncated GGUF", "header")


def test_empty_file(tmp_path, capsys):
    (tmp_path / "empty.gguf").write_bytes(b"")
    rc, _, err = run_cli(capsys, "inspect", tmp_path / "empty.gguf")
    assert_one_line_error(rc, err, "not a GGUF file")


@pytest.mark.slow
def test_text_too_short(smollm2_gguf, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Far too short for a window of 512 tokens. " * 20)
    rc, _, err = run_cli(capsys, "perplexity", smollm2_gguf, "--text", text, "-t", "2")
    assert_one_line_error(rc, err, "short.txt", "text too short", "1024")
    rc, _, err = run_cli(capsys, "kld", smollm2_gguf, smollm2_gguf, "--text", text, "-t", "2")
    assert_one_line_error(rc, err, "text too short")


def test_missing_text(smollm2_gguf, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "perplexity", smollm2_gguf, "--text", tmp_path / "nope.txt")
    assert_one_line_error(rc, err, "nope.txt", "no such text file")


def test_bad_base_logits(smollm2_gguf, tmp_path, capsys):
    bogus = tmp_path / "base.logits"
    bogus.write_bytes(b"_logits_" + bytes(100))
    rc, _, err = run_cli(capsys, "kld", smollm2_gguf, "--base-logits", bogus)
    assert_one_line_error(rc, err, "base-logits file")


def test_kld_needs_base_and_text(smollm2_gguf, capsys):
    rc, _, err = run_cli(capsys, "kld", smollm2_gguf)
    assert_one_line_error(rc, err, "BASE.gguf MODEL.gguf")


def test_header_matches_gguf_reader(smollm2_gguf):
    import gguf

    ours, theirs = read_header(smollm2_gguf), gguf.GGUFReader(smollm2_gguf)
    assert ours.data_offset == theirs.data_offset
    assert [(t.name, t.type, t.n_bytes) for t in ours.tensors] == \
        [(t.name, t.tensor_type, int(t.n_bytes)) for t in theirs.tensors]
    assert ours.metadata["llama.block_count"] == theirs.fields["llama.block_count"].contents()


def test_inspect(smollm2_gguf, capsys):
    info = inspect(smollm2_gguf)
    assert info["architecture"] == "llama"
    assert info["params"] == 134_515_008
    assert info["tensor_types"]["Q4_1"]["count"] > 200
    assert 5 < info["bits_per_weight"] < 6
    assert info["metadata"]["tokenizer.ggml.tokens"] == {"array_of": "string", "length": 49152}
    text = describe(smollm2_gguf)
    assert "llama" in text and "bits/weight" in text and "Q4_1" in text
    rc, out, _ = run_cli(capsys, "inspect", smollm2_gguf, "--json")
    assert rc == 0 and json.loads(out)["tensor_count"] == 272


def test_gpu_offload_warning(smollm2_gguf, capsys):
    import llama_cpp

    check_model(smollm2_gguf, n_gpu_layers=-1)
    warned = "no GPU backend" in capsys.readouterr().err
    assert warned != llama_cpp.llama_supports_gpu_offload()


def test_log_prob_codes_round_trip():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((7, 1001)) * 4).astype(np.float32)
    codes = quantize_log_probs(logits)
    assert codes.shape == (7, row_width(1001)) and codes.dtype == np.uint16
    header = codes[:, :4].copy().view(np.float32)
    decoded = header[:, :1] * codes[:, 4:4 + 1001] + header[:, 1:2]
    exact = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
    covered = exact > exact.max(axis=1, keepdims=True) - LOG_PROB_RANGE
    assert np.abs(decoded - exact)[covered].max() <= header[:, 0].max()  # within one step


def test_kld_of_a_model_with_itself_is_zero():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((50, 300)).astype(np.float32)  # all within the 16 nats stored
    targets = rng.integers(300, size=50)
    stats = KldStats()
    stats.add(logits, targets, quantize_log_probs(logits))
    r = stats.result(chunks=1, ctx=102, seconds=0.0)
    assert abs(r.kld_mean) < 1e-4 and r.top1_agreement == 1.0
    assert r.ppl_model == pytest.approx(r.ppl_base, rel=1e-3)


@pytest.mark.slow
def test_generate_streams_text(smollm2_gguf, capfd):
    rc = main(["generate", str(smollm2_gguf), "-p", "The capital of France is", "-n", "8", "--temp", "0",
               "-t", "2", "--ctx", "256"])
    out, err = capfd.readouterr()
    assert rc == 0 and "Paris" in out
    assert err == ""  # llama.cpp's log is silenced


@pytest.mark.slow
def test_bench_json(smollm2_gguf, capsys):
    rc, out, _ = run_cli(capsys, "bench", smollm2_gguf, "-p", "32", "-n", "4", "-r", "2", "-t", "2", "--json")
    result = json.loads(out)
    assert rc == 0 and result["pp_tps"] > 0 and result["tg_tps"] > 0
    assert result["pp_tps_sd"] >= 0 and result["tg_tps_sd"] >= 0
    assert result["params"] == 134_515_008 and result["backend"]


def test_session_eval_callback_sees_graph_nodes(smollm2_gguf):
    import llama_cpp

    calls = []

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(tensor, ask, user_data):
        calls.append(ask)
        return True

    with Session(smollm2_gguf, n_ctx=32, n_batch=32, threads=2, cb_eval=observe) as session:
        logits = session.decode(np.arange(100, 132, dtype=np.int32), np.arange(32), 0, np.arange(32) >= 30)
    assert logits.shape == (2, 49152) and calls
