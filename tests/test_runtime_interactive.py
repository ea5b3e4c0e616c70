"""ggufkit chat through a pseudo-terminal and ggufkit serve over HTTP, with the real SmolLM2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pexpect
import pytest

pytestmark = pytest.mark.slow

FOOTER = r"\[(\d+) tokens, [\d.]+ tok/s([^\]]*)\]"
LONG_MESSAGE = "Please summarise the following list of words for me: " + "apple banana cherry " * 60


def spawn_chat(model, *args) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "ggufkit", "chat", str(model), "-t", "2", "--temp", "0",
                                           "--seed", "1", *args],
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect(r"\[chatting with")
    child.expect("> ")
    return child


def test_chat_turns_reset_interrupt_and_eof(smollm2_gguf):
    child = spawn_chat(smollm2_gguf, "--ctx", "1024", "--system", "You are a terse assistant.")
    child.sendline("What is the capital of France?")
    child.expect(FOOTER)
    child.expect("> ")
    child.sendline("And of Germany?")
    child.expect(FOOTER)
    child.expect("> ")
    child.sendline("/reset")
    child.expect(r"\[conversation reset\]")
    child.expect("> ")

    child.sendline("Write a very long story about a dragon who learns to bake bread.")
    child.expect_exact("bake bread.\r\n")  # the echo
    child.expect(r"\w+ \w+ \w+")  # the reply has started streaming
    child.sendintr()
    child.expect(FOOTER)
    assert "stopped" in child.match.group(2)
    child.expect("> ")
    child.sendline("/system Answer in one word.")  # the session survived Ctrl-C
    child.expect(r"\[system prompt set\]")
    child.expect("> ")

    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_drops_oldest_turns_when_context_is_full(smollm2_gguf):
    child = spawn_chat(smollm2_gguf, "--ctx", "512", "-n", "64")
    child.sendline(LONG_MESSAGE)
    child.expect(FOOTER)
    child.expect("> ")
    child.sendline(LONG_MESSAGE)
    child.expect(r"\[context full: dropped the oldest turn\]")
    child.expect(FOOTER)
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, seconds: float) -> None:
    """Terminate a server, killed if it is not gone within `seconds`."""
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read()
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    pytest.fail(f"server not up at {url} after {seconds} s")


def test_serve_chat_completion(smollm2_gguf):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ggufkit", "serve", str(smollm2_gguf), "--port", str(port),
                               "--ctx", "1024", "-t", "2"], stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        wait_until_up(f"{base}/models", server)
        body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16, "temperature": 0}
        request = urllib.request.Request(f"{base}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["choices"][0]["message"]["content"].strip()
        assert 0 < reply["usage"]["completion_tokens"] <= 16
    finally:
        server.terminate()
        server.wait(timeout=30)
