"""Split GGUF files in llama-gguf-split's layout: shards named OUT-00001-of-0000N.gguf (the writer
makes them, given a size), each carrying the split.* keys that llama.cpp follows to the next."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import gguf

from ggufkit.errors import GgufkitError

# the keys that tie a shard to its siblings: meaningless in a file written whole
SPLIT_KEYS = (gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
              gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)


def parse_size(text: str, what: str = "size") -> int:
    """'500M', '1.2G', '2G', '1000000' -> bytes (decimal units, as llama-gguf-split reads them;
    a fraction of a unit is rounded down to whole bytes)."""
    units = {"K": 1000, "M": 1000**2, "G": 1000**3}
    text = str(text).strip()
    unit = units.get(text[-1:].upper(), 1)
    number = text[:-1] if text[-1:].upper() in units else text
    try:
        n = int(Decimal(number) * unit) if number and number.lstrip("+").replace(".", "", 1).isdigit() else None
    except InvalidOperation:
        n = None
    if n is None:
        raise GgufkitError(f"invalid {what} {text!r} (expected e.g. 500M, 1.2G or a byte count)")
    if n <= 0:
        raise GgufkitError(f"invalid {what} {text!r}: must be positive")
    return n
