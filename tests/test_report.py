"""`report` and `calib-check` on a tiny numpy checkpoint that llama.cpp runs: the three report files,
KL divergences equal to `ggufkit kld`'s, the calib-check table and verdicts, and bad input refused in
one line with nothing left behind."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sysconfig
from pathlib import Path

import pytest

from ggufkit.cli import main
from ggufkit.commands.calib_check import Difference, Score, verdict
from ggufkit.commands.convert import DEFAULT_CALIBRATION
from ggufkit.commands.report import MARKER, pareto_front
from ggufkit.runtime import kld
from tests import tiny_models

# windows of 64 tokens (the tiny vocabulary is about one token per byte), 2 per text
FAST = ["--ctx", "64", "--chunks", "2", "--calibration-ctx", "64", "--calibration-chunks", "2", "-t", "2"]
CODE = Path(sysconfig.get_paths()["stdlib"])  # a second domain: Python source


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1, err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def assert_nothing_left(folder: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_models.numpy_llama(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def made(tiny, corpus, tmp_path_factory):
    """`ggufkit report --json` on the checkpoint: two types, two texts, an imatrix."""
    out = tmp_path_factory.mktemp("report") / "tiny-report"
    rc, stdout, err = run_cli("report", tiny, "--text", corpus / "emma.txt", "--text", corpus / "northangerabbey.txt",
                              "--types", "Q8_0,q4_0", "--calibration", corpus / "prideprejudice.txt",
                              "--bench-tokens", "4", "--json", "-o", out, *FAST)
    assert rc == 0, err
    return out, json.loads(stdout)


def test_report_writes_its_files(made):
    out, result = made
    assert sorted(p.name for p in out.iterdir()) == ["imatrix.gguf", "report.html", "report.json", "report.png",
                                                     "tiny-F32.gguf", "tiny-Q4_0.gguf", "tiny-Q8_0.gguf"]
    assert json.loads((out / "report.json").read_text()) == result  # --json prints the file's object
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staging folder left
    assert result["texts"] == ["emma.txt", "northangerabbey.txt"] and result["chunks"] == {"emma.txt": 2,
                                                                                          "northangerabbey.txt": 2}
    assert result["calibration"] == ["prideprejudice.txt"]
    rows = result["rows"]
    assert [(r["type"], r["method"], r["file"]) for r in rows] == [
        ("F32", "base", "tiny-F32.gguf"), ("Q8_0", "imatrix", "tiny-Q8_0.gguf"), ("Q4_0", "imatrix", "tiny-Q4_0.gguf")]
    for r in rows:
        assert r["bytes"] == (out / r["file"]).stat().st_size and r["tokens_per_s"] > 0
        for name in result["texts"]:
            s = r["texts"][name]
            assert s["tokens"] == 2 * 31 and s["ppl"] > 1 and 0 <= s["top1"] <= 100
    base, q8, q4 = rows
    assert base["bpw"] == 32 and q4["bpw"] < q8["bpw"] < 9
    for name in result["texts"]:
        assert base["texts"][name]["kld"] == 0 and base["texts"][name]["top1"] == 100
        assert 0 < q8["texts"][name]["kld"] < q4["texts"][name]["kld"]
        assert q8["texts"][name]["pareto"] and q4["texts"][name]["pareto"]  # smaller or better: both on it
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and "tiny-Q4_0.gguf" in page
    outside = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', "", page)
    for external in ("http:", "https:", "<link", "<script", "url(", 'src="'):  # self-contained
        assert external not in outside


def test_report_kld_is_kld_commands(made, corpus):
    """The JSON's divergence for a file is what `ggufkit kld` gives for it on the same windows."""
    out, result = made
    q4 = result["rows"][2]
    direct = kld(out / "tiny-F32.gguf", out / q4["file"], corpus / "emma.txt", ctx=64, chunks=2, threads=2)
    assert q4["texts"]["emma.txt"]["kld"] == pytest.approx(direct.kld_mean, rel=1e-9, abs=1e-12)
    assert q4["texts"]["emma.txt"]["top1"] == pytest.approx(100 * direct.top1_agreement)
    assert q4["texts"]["emma.txt"]["ppl"] == pytest.approx(direct.ppl_model)


def test_report_text_table(made, corpus, tmp_path):
    """From a float GGUF, into a folder replaced with --force; a killed run's staging folder is swept."""
    out, _ = made
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "old.txt").write_text("replaced")
    leftover, foreign = tmp_path / ".r.abc_1234", tmp_path / ".r.zz_98765"
    for folder in (leftover, foreign):
        folder.mkdir()
        (folder / "tiny-Q4_0.gguf").write_bytes(b"half")
    (leftover / MARKER).touch()
    rc, stdout, err = run_cli("report", out / "tiny-F32.gguf", "--text", corpus / "emma.txt", "--types", "Q4_0",
                              "--bench-tokens", "0", "-o", tmp_path / "r", "--force", *FAST)
    assert rc == 0, err
    assert f"removed {leftover}, left by an interrupted run" in err
    assert not leftover.exists() and foreign.exists()  # only our own staging folders go
    lines = stdout.splitlines()
    assert lines[0].split()[:6] == ["file", "type", "method", "MiB", "bpw", "tg"]
    assert lines[1].startswith(str(out / "tiny-F32.gguf")) and " base " in lines[1]  # the source GGUF, not copied
    assert lines[2].startswith("tiny-Q4_0.gguf") and " plain " in lines[2]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.html", "report.json", "report.png",
                                                                 "tiny-Q4_0.gguf"]


def test_report_bad_input(made, tiny, corpus, tmp_path):
    out, _ = made
    emma = corpus / "emma.txt"
    dest = tmp_path / "r"
    cases = [
        (["report", tiny, "--text", tmp_path / "nope.txt", "-o", dest], ("nope.txt", "no such text file")),
        (["report", tiny, "--text", emma, "--types", "Q8_0,Q9_K", "-o", dest], ("--types", "'Q9_K'")),
        (["report", tmp_path / "missing", "--text", emma, "-o", dest], ("missing", "no such file or folder")),
        (["report", emma, "--text", emma, "-o", dest], ("emma.txt", "not a GGUF file")),
        (["report", out / "tiny-Q4_0.gguf", "--text", emma, "-o", dest],
         ("tiny-Q4_0.gguf", "already quantized", "--allow-requantize")),
        (["report", tiny, "--text", emma, "--calibration", tmp_path / "cal.txt", "-o", dest], ("cal.txt",)),
        (["report", tiny, "--text", emma, "-o", out], ("tiny-report", "not empty", "--force")),
    ]
    for argv, fragments in cases:
        rc, _, err = run_cli(*argv, *FAST)
        assert_one_line_error(rc, err, *fragments)
        assert_nothing_left(tmp_path, dest)


def test_report_text_too_short_leaves_nothing(tiny, corpus, tmp_path):
    """Found only once the model tokenizes it, after the base was converted: all of it goes."""
    short = tmp_path / "short.txt"
    short.write_text("Too short for two windows.")
    rc, _, err = run_cli("report", tiny, "--text", corpus / "emma.txt", "--text", short, "--types", "Q8_0",
                         "-o", tmp_path / "r", *FAST)
    assert_one_line_error(rc, err, "short.txt", "text too short")
    assert_nothing_left(tmp_path, tmp_path / "r")


def test_pareto_front():
    # (size, kld): the third is beaten by the second on both counts, the last ties the first on size
    points = [(1, 0.5), (2, 0.1), (3, 0.2), (4, 0.01), (1, 0.6)]
    assert pareto_front(points) == [True, True, False, True, False]


def test_calib_check_table_and_verdicts(made, corpus):
    out, _ = made
    rc, stdout, err = run_cli("calib-check", out / "tiny-F32.gguf", "--calibration", CODE / "argparse.py",
                              "--text", CODE / "typing.py", "--text", corpus / "emma.txt", "--type", "Q4_K_M", *FAST)
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0] == "Q4_K_M of tiny-F32.gguf: mean KL divergence from the unquantized model"
    assert lines[1].split() == ["text", "argparse.py", "imatrix", "no", "imatrix", "calibration.txt", "imatrix"]
    for line, name in zip(lines[2:4], ("typing.py", "emma.txt")):
        cells = line.split()
        assert cells[0] == name and cells[2] == cells[5] == cells[8] == "±"
    assert lines[4] == ""
    assert [line.split(":")[0] for line in lines[5:]] == ["typing.py", "emma.txt"]
    for line in lines[5:]:
        assert line.split(": ")[1] in ("ok", "WORSE")
        assert "argparse.py's imatrix" in line


def test_calib_check_json(made, corpus, tmp_path):
    out, _ = made
    opening = tmp_path / "opening.txt"  # the shipped text's first 20000 characters
    opening.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    rc, stdout, err = run_cli("calib-check", out / "tiny-F32.gguf", "--calibration", opening,
                              "--text", corpus / "emma.txt", "--type", "Q4_0", "--json", *FAST)
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["type"] == "Q4_0" and result["default_calibration"] == "calibration.txt"
    assert result["calibration"] == ["opening.txt"]
    t = result["texts"]["emma.txt"]
    assert {"calibration", "none", "default", "vs_none", "vs_default", "worse", "verdict"} <= set(t)
    # CAL opens as the shipped text does: two windows of either give the same imatrix
    assert t["calibration"]["kld"] == t["default"]["kld"] and t["vs_default"]["kld"] == 0
    assert t["vs_none"]["kld"] == pytest.approx(t["calibration"]["kld"] - t["none"]["kld"])
    assert t["worse"] is False and t["verdict"].startswith("emma.txt: ok:")


def test_calib_check_verdict_flags_only_beyond_the_noise():
    scores = {v: Score(0.05, 0.002, 90.0, 10.0, 1000) for v in ("calibration", "none", "default")}
    line = verdict("code.py", "prose.txt", scores, {"none": Difference(-0.01, 0.001),
                                                    "default": Difference(0.006, 0.001)})
    assert line.startswith("code.py: WORSE: prose.txt's imatrix")
    assert "default calibration text's imatrix by 0.00600 ± 0.00100 (6.0 σ)" in line and "no imatrix" not in line
    line = verdict("code.py", "prose.txt", scores, {"none": Difference(-0.01, 0.001),
                                                    "default": Difference(0.0015, 0.001)})  # 1.5 σ: noise
    assert line.startswith("code.py: ok:")


def test_calib_check_bad_input(tiny, corpus, tmp_path):
    emma = corpus / "emma.txt"
    cases = [
        (["calib-check", tiny, "--calibration", tmp_path / "cal.txt", "--text", emma], ("cal.txt", "no such text")),
        (["calib-check", tiny, "--calibration", emma, "--text", emma, "--type", "Q2_K_S"],
         ("Q2_K_S", "without an importance matrix")),
        (["calib-check", tiny, "--calibration", emma, "--text", emma, "--type", "Q4_K_M,Q8_0"], ("one",)),
    ]
    for argv, fragments in cases:
        rc, _, err = run_cli(*argv, *FAST)
        assert_one_line_error(rc, err, *fragments)
