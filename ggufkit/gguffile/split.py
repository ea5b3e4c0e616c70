"""Split GGUF files in llama-gguf-split's layout: shards named OUT-00001-of-0000N.gguf (the writer
makes them, given a size), each carrying the split.* keys that llama.cpp follows to the next."""

from __future__ import annotations

import gguf

from ggufkit.errors import GgufkitError

# the keys that tie a shard to its siblings: meaningless in a file written whole
SPLIT_KEYS = (gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
              gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)


def parse_size(text: str) -> int:
    """'500M', '2G', '1000000' -> bytes (decimal units, as llama-gguf-split reads them)."""
    units = {"K": 1000, "M": 1000**2, "G": 1000**3}
    try:
        n = int(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else int(text)
    except ValueError:
        raise GgufkitError(f"invalid size {text!r} (expected e.g. 500M or 2G)") from None
    if n <= 0:
        raise GgufkitError(f"invalid size {text!r}: must be positive")
    return n
