"""`ggufkit generate`: one prompt in, the continuation streamed out as plain text. Also the token
streaming that `chat` shares."""

from __future__ import annotations

import codecs
import sys
import time
from dataclasses import dataclass
from typing import Callable

from ggufkit.errors import GgufkitError
from ggufkit.runtime.load import DEFAULT_CTX, load


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's default sampler chain settings."""
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0


@dataclass
class Reply:
    text: str
    tokens: list[int]
    stop: str  # "end" (end-of-generation token), "length" (max tokens or context full), "interrupted"
    prompt_seconds: float  # prompt processing and the first token
    gen_seconds: float  # the tokens after the first

    @property
    def tokens_per_second(self) -> float:
        if len(self.tokens) > 1 and self.gen_seconds > 0:
            return (len(self.tokens) - 1) / self.gen_seconds
        return len(self.tokens) / self.prompt_seconds if self.prompt_seconds > 0 else 0.0


def stream(llm, prompt: list[int], max_tokens: int, sampling: Sampling, write: Callable[[str], None],
           interrupted: Callable[[], bool] = lambda: False) -> Reply:
    """Sample up to `max_tokens` after `prompt`, passing text to `write` as it comes."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    # BPE pieces can split a UTF-8 character: decode incrementally, never piece by piece.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, tokens, stop = [], [], "length"
    t0 = time.perf_counter()
    t_first = None
    generator = llm.generate(prompt, temp=sampling.temp, top_k=sampling.top_k, top_p=sampling.top_p,
                             min_p=sampling.min_p, repeat_penalty=sampling.repeat_penalty)
    try:
        for token in generator:
            t_first = t_first or time.perf_counter()
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                stop = "end"
                break
            tokens.append(token)
            piece = decoder.decode(llm.detokenize([token]))
            text.append(piece)
            write(piece)
            if interrupted():
                stop = "interrupted"
                break
            if len(tokens) >= max_tokens:
                break
    finally:
        generator.close()
    tail = decoder.decode(b"", final=True)
    if tail:
        text.append(tail)
        write(tail)
    t_end = time.perf_counter()
    t_first = t_first or t_end
    return Reply("".join(text), tokens, stop, t_first - t0, t_end - t_first)


def chat_prompt(llm, messages: list[dict]) -> list[int]:
    """`messages` rendered with the chat template stored in the GGUF, as tokens."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise GgufkitError("this GGUF has no chat template (tokenizer.chat_template)", llm.model_path)
    special = [llm.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else ""
               for t in (llm.token_eos(), llm.token_bos())]
    try:
        prompt = Jinja2ChatFormatter(template, eos_token=special[0], bos_token=special[1])(messages=messages).prompt
    except Exception as exc:  # jinja2 errors, and templates that raise_exception() on unsupported roles
        raise GgufkitError(f"the chat template failed: {exc}", llm.model_path) from None
    # The template writes BOS itself when the model wants one.
    return llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(model, prompt: str, n_predict: int = 256, chat: bool = False, system: str | None = None,
             ctx: int = DEFAULT_CTX, n_gpu_layers: int = 0, threads: int | None = None,
             sampling: Sampling = Sampling(), seed: int | None = None,
             write: Callable[[str], None] = write_stdout, rpc=None) -> Reply:
    """Continue `prompt` (or, with chat=True, answer it as a user message) and stream the text."""
    llm = load(model, n_ctx=ctx, n_gpu_layers=n_gpu_layers, threads=threads, rpc=rpc,
               **({} if seed is None else {"seed": seed}))
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        tokens = chat_prompt(llm, messages)
    else:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    room = ctx - len(tokens)
    if room <= 0:
        raise GgufkitError(f"the prompt is {len(tokens)} tokens, the context only {ctx} (raise --ctx)")
    return stream(llm, tokens, min(n_predict, room), sampling, write)
