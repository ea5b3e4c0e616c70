"""The CLI: every command explains itself, and user errors are one line with a non-zero exit."""

import subprocess
import sys

import pytest

from ggufkit.cli import build_parser, main


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ggufkit " + command) and len(out) > 200


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ggufkit", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "convert" in proc.stdout and "export-hf" in proc.stdout


def test_export_hf_of_a_missing_file_is_one_line(tmp_path, capsys):
    code = main(["export-hf", str(tmp_path / "nope.gguf"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "nope.gguf" in err and "no such file" in err


def test_export_hf_of_a_non_gguf_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    code = main(["export-hf", str(bad), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "bad.gguf" in err
    assert not (tmp_path / "out").exists()


def test_negative_threads_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tmp_path / "in.gguf"), str(tmp_path / "out.gguf"), "Q8_0", "--threads", "-1"])
    assert exc.value.code == 2
    assert "--threads: threads must be at least 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "out.gguf").exists()
