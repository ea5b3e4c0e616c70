"""`ggufkit chat`: an interactive conversation in the terminal, formatted with the GGUF's own chat
template, streamed token by token."""

from __future__ import annotations

import signal
from typing import Callable

from ggufkit.errors import GgufkitError
from ggufkit.runtime.generate import Reply, Sampling, chat_prompt, stream, write_stdout
from ggufkit.runtime.load import DEFAULT_CTX, load

HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /exit quits; " \
       "Ctrl-C stops a reply, Ctrl-D quits"
REPLY_RESERVE = 256  # tokens kept free for the answer when old turns must be dropped


class Conversation:
    def __init__(self, system: str | None):
        self.system = system
        self.turns: list[tuple[str, str]] = []  # (user, assistant)

    def messages(self, user: str) -> list[dict]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.turns:
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return out + [{"role": "user", "content": user}]


def fit_prompt(llm, conv: Conversation, user: str) -> tuple[list[int], int]:
    """The prompt for `user`'s message, dropping the oldest turns until it leaves room for a reply;
    returns the tokens and how many turns were dropped."""
    reserve = min(REPLY_RESERVE, llm.n_ctx() // 4)
    dropped = 0
    while True:
        tokens = chat_prompt(llm, conv.messages(user))
        if len(tokens) + reserve <= llm.n_ctx() or not conv.turns:
            break
        conv.turns.pop(0)
        dropped += 1
    if len(tokens) >= llm.n_ctx():
        raise GgufkitError(f"that message needs {len(tokens)} tokens, the context holds {llm.n_ctx()} (raise --ctx)")
    return tokens, dropped


class StopOnSigint:
    """While active, Ctrl-C only raises a flag, so a reply ends cleanly and the session goes on."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def __call__(self) -> bool:
        return self.hit


def reply_footer(reply: Reply, n_ctx: int, prompt_len: int) -> str:
    notes = {"interrupted": " stopped", "length": " cut: context full" if prompt_len + len(reply.tokens) >= n_ctx
             else " cut: length limit"}
    return f"[{len(reply.tokens)} tokens, {reply.tokens_per_second:.1f} tok/s{notes.get(reply.stop, '')}]"


def answer(llm, conv: Conversation, user: str, max_tokens: int | None, sampling: Sampling,
           write: Callable[[str], None], stop: StopOnSigint) -> None:
    try:
        tokens, dropped = fit_prompt(llm, conv, user)
    except GgufkitError as exc:
        write(f"[{exc}]\n")
        return
    if dropped:
        write(f"[context full: dropped the {'oldest turn' if dropped == 1 else f'{dropped} oldest turns'}]\n")
    room = llm.n_ctx() - len(tokens)
    reply = stream(llm, tokens, room if max_tokens is None else min(max_tokens, room), sampling, write, stop)
    write(f"\n{reply_footer(reply, llm.n_ctx(), len(tokens))}\n")
    conv.turns.append((user, reply.text))


def command(line: str, conv: Conversation, write: Callable[[str], None]) -> bool:
    """Run a /command; False when the session should end."""
    name, _, arg = line.partition(" ")
    if name == "/exit":
        return False
    if name == "/reset":
        conv.turns.clear()
        write("[conversation reset]\n")
    elif name == "/system":
        if arg.strip():
            conv.system = arg.strip()
            write("[system prompt set]\n")
        else:
            shown = repr(conv.system) if conv.system else "none (the template's default applies)"
            write(f"[system prompt: {shown}]\n")
    else:
        write(f"[unknown command {name}; {HELP}]\n")
    return True


def chat(model, system: str | None = None, ctx: int = DEFAULT_CTX, max_tokens: int | None = None,
         n_gpu_layers: int = 0, threads: int | None = None, sampling: Sampling = Sampling(), seed: int | None = None,
         read: Callable[[str], str] = input, write: Callable[[str], None] = write_stdout, rpc=None) -> None:
    """Chat with `model` until /exit or end of input; replies stop at `max_tokens` or a full context."""
    import readline  # noqa: F401  (gives input() line editing and history)

    llm = load(model, n_ctx=ctx, n_gpu_layers=n_gpu_layers, threads=threads, rpc=rpc,
               **({} if seed is None else {"seed": seed}))
    if not llm.metadata.get("tokenizer.chat_template"):
        raise GgufkitError("this GGUF has no chat template (tokenizer.chat_template); use generate", model)
    conv = Conversation(system)
    write(f"[chatting with {model}, context {ctx} tokens; {HELP}]\n")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n[Ctrl-C stops a reply; /exit or Ctrl-D quits]\n")
            continue
        if line.startswith("/"):
            if not command(line, conv, write):
                return
        elif line:
            with StopOnSigint() as stop:  # from Enter on, so an early Ctrl-C cannot end the session
                answer(llm, conv, line, max_tokens, sampling, write, stop)
