"""`ggufkit serve`: an OpenAI-compatible HTTP server (llama-cpp-python's) for one GGUF, and a chat
page at / that talks to it."""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import ipaddress
import re
import sys

from ggufkit.runtime.load import DEFAULT_CTX, check_model, default_threads
from ggufkit.runtime.rpc import offloaded_layers, rpc_devices


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def chat_page() -> tuple[str, str]:
    """The chat page's HTML and a Content-Security-Policy for it: only its own inline script (by hash)
    runs, and it may connect only to this server, so the page loads nothing from elsewhere and markup
    that got into a reply could run nothing."""
    html = importlib.resources.files("ggufkit.runtime").joinpath("chat_page.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")
    return html, csp


def serve(model, host: str = "127.0.0.1", port: int = 8000, ctx: int = DEFAULT_CTX, n_gpu_layers: int = 0,
          threads: int | None = None, api_key: str | None = None, rpc=None) -> None:
    """Serve `model` at http://host:port/v1, and the chat page at http://host:port/, until interrupted;
    `rpc`: ggml-rpc-servers (HOST:PORT) to run it on."""
    n_gpu_layers = offloaded_layers(n_gpu_layers, rpc)
    import uvicorn
    from fastapi.responses import HTMLResponse
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    if not is_loopback(host) and api_key is None:
        print(f"ggufkit serve: warning: listening on {host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    n = default_threads(threads)
    # ModelSettings.rpc_servers reaches llama_cpp.Llama, which ignores it (0.3.36): the devices are
    # registered here instead, while create_app loads the model
    with rpc_devices(rpc):
        header = check_model(model, n_gpu_layers)
        # Prefer the GGUF's own template over llama-cpp-python's guess from known template texts.
        chat_format = "chat_template.default" if "tokenizer.chat_template" in header.metadata else None
        app = create_app(
            server_settings=ServerSettings(host=host, port=port, api_key=api_key),
            model_settings=[ModelSettings(model=str(model), model_alias=header.path.stem, n_ctx=ctx,
                                          n_gpu_layers=n_gpu_layers, n_threads=n, n_threads_batch=n,
                                          chat_format=chat_format, verbose=False)],
        )
    html, csp = chat_page()

    # Open without the API key: the page holds no secrets, and asks for the key when the API wants it.
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    print(f"ggufkit serve: {header.path.name} at http://{host}:{port}/v1, chat page at "
          f"http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
