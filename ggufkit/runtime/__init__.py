"""Running and measuring GGUF files through llama-cpp-python.

Each command is a plain function here, named after its module: load, chat, generate, serve,
perplexity, kld, bench, inspect (and describe). Import helpers from the modules themselves
(`from ggufkit.runtime.kld import BaseLogits`): the package attribute of each name is the function."""

from ggufkit.runtime.bench import bench
from ggufkit.runtime.chat import chat
from ggufkit.runtime.generate import generate
from ggufkit.runtime.inspect import describe, inspect
from ggufkit.runtime.kld import kld
from ggufkit.runtime.load import load
from ggufkit.runtime.perplexity import perplexity
from ggufkit.runtime.serve import serve

__all__ = ["bench", "chat", "describe", "generate", "inspect", "kld", "load", "perplexity", "serve"]
