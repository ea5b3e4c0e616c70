"""ggufkit serve's chat page in a real headless browser (Debian's chromium, driven through its
chromedriver by selenium), against the real SmolLM2: replies stream in, stop stops them, a reload
keeps the conversation, the markdown renderer makes no markup of its own from the text, and the
page asks for the API key when the server wants one. `make setup-test` installs chromium; without it
these tests fail rather than skip."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.test_runtime_interactive import free_port, stop, wait_until_up

pytestmark = [pytest.mark.slow, pytest.mark.models]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 180  # seconds; SmolLM2 on two busy cores is slow-ish


@contextlib.contextmanager
def running_server(model, *args):
    """`ggufkit serve` on a free loopback port; yields the page's URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ggufkit", "serve", str(model), "--port", str(port),
                               "--ctx", "2048", "-t", "2", *args], stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", server)
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop(server, 30)


@pytest.fixture(scope="module")
def page_url(smollm2_gguf):
    with running_server(smollm2_gguf) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    assert Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file(), \
        "Debian's chromium and chromium-driver are missing: `make setup-test` installs them"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below, selenium-manager downloads nothing
    # The background-networking flags keep chromium from calling out: this network refuses it.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, seconds: float = WAIT, message: str = ""):
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(), message)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def set_field(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def open_settings(driver) -> None:
    if not js(driver, "return document.getElementById('settings-box').open"):
        driver.find_element(By.CSS_SELECTOR, "#settings-box summary").click()


def send_message(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)  # Enter sends


def shown_messages(driver) -> list[tuple[str, str, str]]:
    """(role, text as shown, note) of every message on the page."""
    return [tuple(m) for m in js(driver, """
        return [...document.querySelectorAll('#messages .msg')].map(m => [
            m.classList.contains('user') ? 'user' : m.classList.contains('assistant') ? 'assistant' : 'error',
            m.querySelector('.content') ? m.querySelector('.content').innerText.trim() : m.innerText,
            m.querySelector('.note') ? m.querySelector('.note').innerText : '']);""")]


def reply_snapshot(driver) -> tuple[str, str]:
    """The page's state ('generating' or 'idle') and the last reply's text as shown, read together."""
    state, text = js(driver, """
        const replies = document.querySelectorAll('#messages .msg.assistant .content');
        return [document.body.dataset.state, replies.length ? replies[replies.length - 1].innerText.trim() : ''];""")
    return state, text


def input_usable(driver) -> bool:
    return js(driver, """return !document.getElementById('input').disabled
        && !document.getElementById('send').disabled && document.getElementById('stop').disabled;""")


def test_chat_streams_stops_and_keeps_the_conversation(browser, page_url, smollm2_gguf):
    driver = browser
    html = urllib.request.urlopen(page_url, timeout=30)
    assert "default-src 'none'" in html.headers["Content-Security-Policy"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", html.read().decode())

    driver.get(page_url)
    wait_for(driver, lambda: driver.find_element(By.ID, "model").text == smollm2_gguf.stem,
             30, "the model's alias from /v1/models is shown")
    assert input_usable(driver)
    open_settings(driver)
    set_field(driver, "system", "You are a helpful assistant.")
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", 64)

    # 1. The reply streams in: it is seen growing while the page is still generating.
    send_message(driver, "Write a short poem about the sea.")
    seen = []
    deadline = time.monotonic() + WAIT
    while True:
        state, text = reply_snapshot(driver)
        if state == "idle":
            break
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        assert time.monotonic() < deadline, f"no complete reply after {WAIT} s"
        time.sleep(0.02)
    final = reply_snapshot(driver)[1]
    assert len(seen) >= 2, f"the reply did not grow in view: {seen}"
    assert 0 < len(seen[0]) < len(final)
    assert input_usable(driver)
    assert shown_messages(driver) == [("user", "Write a short poem about the sea.", ""), ("assistant", final, "")]

    # 2. Stop during a long reply: it stops growing, is marked stopped, and the input works again.
    set_field(driver, "max-tokens", 512)
    send_message(driver, "Write a very long story about a dragon who learns to bake bread.")
    wait_for(driver, lambda: len(reply_snapshot(driver)[1]) >= 40, message="the long reply started")
    driver.find_element(By.ID, "stop").click()
    wait_for(driver, lambda: input_usable(driver), 10, "the input is usable again after stop")
    stopped = reply_snapshot(driver)[1]
    for _ in range(10):  # well past SmolLM2's token rate
        time.sleep(0.3)
        assert reply_snapshot(driver) == ("idle", stopped)
    assert shown_messages(driver)[-1] == ("assistant", stopped, "(stopped)")

    # ... and the server, released by the disconnect, answers the next message.
    set_field(driver, "max-tokens", 16)
    send_message(driver, "Thank you!")
    wait_for(driver, lambda: reply_snapshot(driver)[0] == "idle" and len(shown_messages(driver)) == 6,
             message="a reply after the stopped one")
    before = shown_messages(driver)
    assert before[-1][0] == "assistant" and before[-1][1] and before[-1][2] == ""
    assert not [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert all(url.startswith(page_url)
               for url in js(driver, "return performance.getEntriesByType('resource').map(e => e.name)"))

    # 3. A reload shows the same conversation, and the settings, again.
    driver.refresh()
    wait_for(driver, lambda: len(shown_messages(driver)) == 6, 30, "the conversation after a reload")
    assert shown_messages(driver) == before
    assert driver.find_element(By.ID, "system").get_attribute("value") == "You are a helpful assistant."
    assert input_usable(driver)

    # 4. New chat forgets it, across reloads too.
    driver.find_element(By.ID, "new-chat").click()
    assert shown_messages(driver) == []
    driver.refresh()
    wait_for(driver, lambda: driver.find_element(By.ID, "model").text == smollm2_gguf.stem, 30)
    assert shown_messages(driver) == []
    assert driver.find_element(By.ID, "empty").is_displayed()


NASTY = [
    "<script>window.pwned = 1</script>",
    "<img src=x onerror='window.pwned = 1'>",
    '<a href="javascript:window.pwned = 1">x</a>',
    "[x](javascript:window.pwned=1) [y](data:text/html,hi) [z](//evil.example/)",
    '[x](https://a.example/"onmouseover="window.pwned=1)',
    "**<i onclick=x>b</i>** _<svg onload=x>_ `<b onclick=x>`",
    "```\n</code></pre><script>window.pwned = 1</script>\n```",
    "# <iframe src=javascript:x>\n- <object data=x>\n1. <style>*{}</style>",
    "\u00000\u0000 [a](https://ok.example/) \u00000\u0000",
]
ALLOWED = {"P", "BR", "STRONG", "EM", "CODE", "PRE", "A", "UL", "OL", "LI", "H1", "H2", "H3", "H4", "H5", "H6"}


def test_markdown_renderer_is_safe_and_renders_markup(browser, page_url):
    driver = browser
    driver.get(page_url)
    render = "return renderMarkdown(arguments[0])"
    for text in NASTY:
        # Put each result into the page, as replies are, and see what elements and attributes it made.
        elements = js(driver, """
            const box = document.createElement('div');
            box.innerHTML = renderMarkdown(arguments[0]);
            document.body.append(box);
            return [...box.querySelectorAll('*')].map(e => [e.tagName, e.getAttributeNames(), e.getAttribute('href')]);
            """, text)
        for tag, attributes, href in elements:
            assert tag in ALLOWED, (text, tag)
            assert set(attributes) <= {"href", "target", "rel", "class"}, (text, attributes)
            assert href is None or re.match(r"(https?://|mailto:)", href), (text, href)
    assert js(driver, "return window.pwned") is None

    assert js(driver, render, "a < b & \"c\"") == "<p>a &lt; b &amp; &quot;c&quot;</p>"
    assert js(driver, render, "**bold**, *it*, _it_ and `x **y** <z>`") == \
        "<p><strong>bold</strong>, <em>it</em>, <em>it</em> and <code>x **y** &lt;z&gt;</code></p>"
    assert js(driver, render, "snake_case_name and 2 * 3 * 4") == "<p>snake_case_name and 2 * 3 * 4</p>"
    assert js(driver, render, "## Title\nline one\nline two\n\n- a\n- b\n\n1. x\n2. y") == \
        "<h2>Title</h2>\n<p>line one<br>line two</p>\n<ul><li>a</li><li>b</li></ul>\n<ol><li>x</li><li>y</li></ol>"
    assert js(driver, render, "```python\nif a < b:\n    print('**x**')\n```\nafter") == \
        "<pre><code class=\"language-python\">if a &lt; b:\n    print(&#39;**x**&#39;)</code></pre>\n<p>after</p>"
    assert js(driver, render, "```\nstill streaming") == "<pre><code>still streaming</code></pre>"
    assert js(driver, render, "see [the docs](https://example.com/a?b=1&c=2)") == \
        '<p>see <a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">the docs</a></p>'


def test_page_asks_for_the_api_key(browser, smollm2_gguf):
    driver = browser
    with running_server(smollm2_gguf, "--api-key", "sekret-123") as url:
        driver.get(url)  # the page itself needs no key
        key = driver.find_element(By.ID, "api-key")
        wait_for(driver, key.is_displayed, 30, "the key field is shown when /v1/models answers 401")
        assert "API key" in driver.find_element(By.ID, "status").text
        key.send_keys("sekret-123", Keys.TAB)  # Tab: the change that makes the page try the key
        wait_for(driver, lambda: driver.find_element(By.ID, "model").text == smollm2_gguf.stem, 30,
                 "the model's alias, read with the key")
        set_field(driver, "max-tokens", 8)
        send_message(driver, "Hello!")
        wait_for(driver, lambda: reply_snapshot(driver)[0] == "idle" and len(shown_messages(driver)) == 2,
                 message="a reply with the key")
        assert shown_messages(driver)[-1][0] == "assistant" and shown_messages(driver)[-1][1]
