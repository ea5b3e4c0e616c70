"""The runtime's commands (chat, generate, serve, perplexity, kld, bench, inspect): each parses its
options and calls the plain function."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ggufkit.errors import GgufkitError
from ggufkit.runtime.bench import DEFAULT_BATCH as BENCH_BATCH
from ggufkit.runtime.bench import bench
from ggufkit.runtime.bench import report as bench_report
from ggufkit.runtime.chat import HELP as CHAT_HELP
from ggufkit.runtime.chat import chat
from ggufkit.runtime.generate import Sampling, generate
from ggufkit.runtime.inspect import describe, inspect
from ggufkit.runtime.kld import kld
from ggufkit.runtime.kld import report as kld_report
from ggufkit.runtime.load import DEFAULT_CTX
from ggufkit.runtime.perplexity import DEFAULT_BATCH as WINDOW_BATCH
from ggufkit.runtime.perplexity import DEFAULT_CTX as WINDOW_CTX
from ggufkit.runtime.perplexity import perplexity
from ggufkit.runtime.perplexity import report as perplexity_report
from ggufkit.runtime.rpc import parse_servers
from ggufkit.runtime.serve import serve


def _servers(value: str) -> list[str]:
    try:
        return parse_servers(value)
    except GgufkitError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--rpc: ")) from None


def add_rpc_argument(p, what: str = "run the model's layers on these ggml-rpc-servers") -> None:
    """--rpc, for every command that runs a model through llama.cpp."""
    p.add_argument("--rpc", type=_servers, default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help=f"{what} (llama.cpp's RPC backend, for a model too large for this machine): all "
                   "layers go to them unless --n-gpu-layers says how many. Needs a llama-cpp-python built "
                   "with GGML_RPC, or GGUFKIT_GGML_RPC (README: RPC)")


def _model_options(p, ctx: int) -> None:
    p.add_argument("--ctx", "-c", type=int, default=ctx, help=f"context size in tokens (default: {ctx})")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=0,
                   help="layers to offload to the GPU, -1 for all (default: 0)")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    add_rpc_argument(p)


def _sampling_options(p) -> None:
    d = Sampling()
    p.add_argument("--temp", type=float, default=d.temp, help=f"temperature, 0 for greedy (default: {d.temp})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"(default: {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"(default: {d.top_p})")
    p.add_argument("--min-p", type=float, default=d.min_p, help=f"(default: {d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, help=f"(default: {d.repeat_penalty})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def _sampling(args) -> Sampling:
    return Sampling(args.temp, args.top_k, args.top_p, args.min_p, args.repeat_penalty)


def _print(result, as_json: bool, report) -> None:
    print(json.dumps(asdict(result)) if as_json else report(result))


def cmd_chat(args) -> int:
    chat(args.model, system=args.system, ctx=args.ctx, max_tokens=args.n_predict, n_gpu_layers=args.n_gpu_layers,
         threads=args.threads, sampling=_sampling(args), seed=args.seed, rpc=args.rpc)
    return 0


def cmd_generate(args) -> int:
    generate(args.model, args.prompt, n_predict=args.n_predict, chat=args.chat, system=args.system, ctx=args.ctx,
             n_gpu_layers=args.n_gpu_layers, threads=args.threads, sampling=_sampling(args), seed=args.seed,
             rpc=args.rpc)
    print()
    return 0


def cmd_serve(args) -> int:
    serve(args.model, host=args.host, port=args.port, ctx=args.ctx, n_gpu_layers=args.n_gpu_layers,
          threads=args.threads, api_key=args.api_key, rpc=args.rpc)
    return 0


def cmd_perplexity(args) -> int:
    result = perplexity(args.model, args.text, ctx=args.ctx, chunks=args.chunks, batch=args.batch,
                        n_gpu_layers=args.n_gpu_layers, threads=args.threads, rpc=args.rpc)
    _print(result, args.json, perplexity_report)
    return 0


def cmd_kld(args) -> int:
    if args.base_logits is None and (len(args.models) != 2 or args.text is None):
        raise GgufkitError("give BASE.gguf MODEL.gguf and --text, or MODEL.gguf and --base-logits")
    if args.base_logits is not None and len(args.models) != 1:
        raise GgufkitError("with --base-logits give only MODEL.gguf")
    base = args.models[0] if len(args.models) == 2 else None
    result = kld(base, args.models[-1], args.text, ctx=args.ctx, chunks=args.chunks, batch=args.batch,
                 save_base=args.save_base, base_logits=args.base_logits, n_gpu_layers=args.n_gpu_layers,
                 threads=args.threads, rpc=args.rpc)
    _print(result, args.json, kld_report)
    return 0


def cmd_bench(args) -> int:
    result = bench(args.model, n_prompt=args.n_prompt, n_gen=args.n_gen, reps=args.reps,
                   threads=args.threads, n_gpu_layers=args.n_gpu_layers, batch=args.batch)
    _print(result, args.json, bench_report)
    return 0


def cmd_inspect(args) -> int:
    print(json.dumps(inspect(args.model)) if args.json else describe(args.model))
    return 0


def _window_options(p) -> None:
    p.add_argument("--ctx", "-c", type=int, default=WINDOW_CTX,
                   help=f"window size in tokens (default: {WINDOW_CTX})")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N windows (default: all)")
    p.add_argument("--batch", "-b", type=int, default=WINDOW_BATCH,
                   help="tokens per decode: below --ctx or a multiple of it, which evaluates several "
                   f"windows at once (default: {WINDOW_BATCH})")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=0, help="layers to offload, -1 for all (default: 0)")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    add_rpc_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a GGUF model in the terminal",
                       description="Interactive chat using the GGUF's chat template. " + CHAT_HELP + ".")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--n-predict", "-n", type=int, default=None,
                   help="max tokens per reply (default: until the context is full)")
    _model_options(p, DEFAULT_CTX)
    _sampling_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one-shot text generation, streamed to stdout",
                       description="Continue PROMPT (or answer it, with --chat) and stream the text to stdout.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--n-predict", "-n", type=int, default=256, help="max tokens to generate (default: 256)")
    p.add_argument("--chat", action="store_true", help="format PROMPT as a user message with the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    _model_options(p, DEFAULT_CTX)
    _sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="Serve MODEL.gguf with llama-cpp-python's OpenAI-compatible server "
                       "(/v1/chat/completions, /v1/completions, /v1/models), and a chat page at / "
                       "(open http://HOST:PORT/ in a browser: streamed replies with the model's chat "
                       "template, a system prompt, a stop button; it needs no network).")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--api-key", default=None, help="require this bearer token")
    _model_options(p, DEFAULT_CTX)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("perplexity", help="perplexity on a text, as llama-perplexity",
                       description="Perplexity by llama-perplexity's method: windows of --ctx tokens, "
                       "the second half of each scored. Needs a text of at least 2 x ctx tokens.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--text", "-f", required=True, metavar="FILE")
    _window_options(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("kld", help="KL divergence from a base model, as llama-perplexity --kl-divergence",
                       description="KL divergence, same-top-token rate and both perplexities of MODEL "
                       "against BASE over the perplexity windows of --text. The base log-probs are "
                       "stored in llama.cpp's base-logits format (about 2 bytes x vocabulary per scored "
                       "token); --save-base keeps them, --base-logits reuses them (then give only MODEL).")
    p.add_argument("models", nargs="+", metavar="BASE.gguf MODEL.gguf")
    p.add_argument("--text", "-f", default=None, metavar="FILE")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--save-base", metavar="FILE", help="write the base log-probs here")
    group.add_argument("--base-logits", metavar="FILE",
                       help="base log-probs from --save-base or llama-perplexity --kl-divergence-base "
                       "(their windows and ctx are used; --text and --ctx are not needed)")
    _window_options(p)
    p.set_defaults(func=cmd_kld)

    p = sub.add_parser("bench", help="prompt and generation speed, as llama-bench",
                       description="Tokens/s of prompt processing (pp) and generation (tg), mean ± sd "
                       "over repetitions after a warm-up, as llama-bench measures them.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens, 0 to skip (default: 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens, 0 to skip (default: 128)")
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions (default: 3)")
    p.add_argument("-b", "--batch", type=int, default=BENCH_BATCH,
                   help=f"prompt batch size (default: {BENCH_BATCH})")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=0, help="layers to offload, -1 for all (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", help="architecture, metadata, tensor types and bits per weight of a GGUF",
                       description="Summarize a GGUF from its header (tensor data is not read).")
    p.add_argument("model", metavar="FILE.gguf")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)
