"""--rpc: llama.cpp's RPC backend. A ggml-rpc-server built from the vendored llama.cpp runs on loopback
and ggufkit perplexity runs the model on it; and the one-line errors of bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from ggufkit.cli import main
from ggufkit.runtime.rpc import ENV, offloaded_layers, parse_servers
from tests.test_runtime_interactive import free_port, stop

THREADS = "2"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ = 100)


@pytest.fixture
def rpc_server(tmp_path):
    """(HOST:PORT, libggml-rpc.so, the server process): a ggml-rpc-server on loopback."""
    from reference.llama_cpp import llama_rpc

    server, lib = llama_rpc()
    port = free_port()
    log = open(tmp_path / "rpc-server.log", "w+")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port), "-t", THREADS],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:  # each probe is a client the server accepts and sees leave
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"ggml-rpc-server did not start:\n{log.read()}")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", lib, proc
    finally:
        stop(proc, 10)
        log.close()


def ggufkit_json(capsys, *args) -> dict:
    assert main([*map(str, args), "-t", THREADS, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.tools
@pytest.mark.models
def test_perplexity_through_rpc_server_equals_local(smollm2_gguf, corpus, rpc_server, monkeypatch, capsys):
    endpoint, lib, proc = rpc_server
    monkeypatch.setenv(ENV, str(lib))
    args = ["perplexity", smollm2_gguf, "-f", corpus / "emma.txt", "-c", 128, "--chunks", 4]
    local = ggufkit_json(capsys, *args)
    before = cpu_seconds(proc.pid)
    remote = ggufkit_json(capsys, *args, "--rpc", endpoint)
    # every layer ran in the server: loading the weights into it and the 4 windows through it cost it
    # CPU time (an idle server uses none)
    assert cpu_seconds(proc.pid) - before > 0.2
    # Equal, not close: the server runs the same graph with ggml's CPU backend built from the same
    # source with the same flags (GGML_NATIVE, on this machine) as llama-cpp-python's, on as many
    # threads, and RPC moves tensors as raw bytes; only the token embedding lookup, a copy, stays here.
    # (A server built for another CPU, or a GPU, would give close results, not equal ones.)
    assert remote["ppl"] == local["ppl"]
    assert remote["ppl_stderr"] == local["ppl_stderr"]
    assert remote["tokens"] == local["tokens"] == 4 * 63  # per window: its second half, less one

    # a second server that is not there: one line, not ggml's abort
    closed = f"127.0.0.1:{free_port()}"
    assert main([*map(str, args), "--rpc", f"{endpoint},{closed}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"ggufkit perplexity: error: --rpc: cannot reach the RPC server at {closed}: Connection refused"

    # the server's devices are off ggml's registry after each run: with the server gone, the same
    # process still runs locally (a device left behind would make ggml abort, unable to connect)
    proc.terminate()
    proc.wait(timeout=10)
    assert ggufkit_json(capsys, *args)["ppl"] == local["ppl"]


@pytest.mark.parametrize("value", ["localhost", "host:port", ":50052", "host:", "host:0", "host:65536",
                                   "a:1,b", "::1:50052", "a:1,,b:2"])
def test_bad_server_is_a_one_line_usage_error(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["perplexity", str(tmp_path / "m.gguf"), "-f", str(tmp_path / "t.txt"), "--rpc", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ggufkit perplexity: error: argument --rpc: '") and "is not HOST:PORT" in err


def test_parse_servers():
    assert parse_servers("10.0.0.2:50052, gpu-box:50053,10.0.0.2:50052") == ["10.0.0.2:50052", "gpu-box:50053"]
    assert parse_servers(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert parse_servers(None) == parse_servers([]) == []


def test_rpc_offloads_all_layers_unless_told():
    assert offloaded_layers(0, ["a:1"]) == -1
    assert offloaded_layers(12, ["a:1"]) == 12
    assert offloaded_layers(0, []) == offloaded_layers(0, None) == 0


@pytest.mark.parametrize("command", ["chat", "generate", "serve", "perplexity", "imatrix"])
def test_without_an_rpc_backend_is_one_line(command, tmp_path, monkeypatch, capsys):
    """This llama-cpp-python has no RPC backend, and GGUFKIT_GGML_RPC is not set: every command with
    --rpc says how to get one, before it touches the model."""
    import llama_cpp

    if llama_cpp.llama_supports_rpc():
        pytest.skip("this llama-cpp-python has the RPC backend")
    monkeypatch.delenv(ENV, raising=False)
    text = tmp_path / "t.txt"
    text.write_text("some text " * 100)
    extra = {"generate": ["-p", "hi"], "perplexity": ["-f", text], "imatrix": ["-f", text, "-o", tmp_path / "i.gguf"]}
    assert main([command, str(tmp_path / "m.gguf"), *map(str, extra.get(command, [])), "--rpc", "127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"ggufkit {command}: error: this llama-cpp-python has no RPC backend: reinstall it "
                          'with CMAKE_ARGS="-DGGML_RPC=on", or set GGUFKIT_GGML_RPC')


def test_rpc_library_that_is_not_one_is_one_line(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import llama_cpp

    if llama_cpp.llama_supports_rpc():
        pytest.skip("this llama-cpp-python has the RPC backend")
    text = tmp_path / "t.txt"
    text.write_text("some text " * 100)
    args = ["perplexity", str(tmp_path / "m.gguf"), "-f", str(text), "--rpc", "127.0.0.1:9"]

    def error(lib) -> str:
        monkeypatch.setenv(ENV, str(lib))
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err.removeprefix("ggufkit perplexity: error: ")

    assert error(tmp_path / "libggml-rpc.so") == f"{ENV}={tmp_path / 'libggml-rpc.so'}: no such file"
    (tmp_path / "junk.so").write_bytes(b"not a library")
    assert error(tmp_path / "junk.so").startswith(f"{ENV}: {tmp_path / 'junk.so'}: ")
    # a ggml library, already loaded in this process, but not the RPC backend
    base = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so.0"
    assert error(base) == f"{ENV}={base} is not ggml's RPC backend (it has no ggml_backend_rpc_reg)"


def test_convert_rpc_needs_calibration(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "ckpt"), "-o", str(tmp_path / "o.gguf"), "--type", "Q4_K_M",
                 "--rpc", "127.0.0.1:9"]) == 1
    assert capsys.readouterr().err.strip() == ("ggufkit convert: error: --rpc runs the --calibration measurement; "
                                               "without --calibration it has nothing to do")
