"""`ggufkit inspect`: what a GGUF holds, from its header alone (no tensor data is read)."""

from __future__ import annotations

from collections import Counter

from ggufkit.gguffile.reader import ArrayInfo, GgufHeader, read_header

SHOWN_VALUE_CHARS = 72


def _json_value(value):
    if isinstance(value, ArrayInfo):
        return {"array_of": value.type.name.lower(), "length": value.length}
    return value


def inspect(path) -> dict:
    """Everything `describe` shows, as JSON-ready data."""
    return _summary(read_header(path))


def _summary(h: GgufHeader) -> dict:
    n_params = sum(t.n_elements for t in h.tensors)
    n_bytes = sum(t.n_bytes for t in h.tensors)
    types = Counter(t.type.name for t in h.tensors)
    type_bytes = Counter()
    for t in h.tensors:
        type_bytes[t.type.name] += t.n_bytes
    return {
        "path": str(h.path),
        "gguf_version": h.version,
        "architecture": h.architecture,
        "name": h.metadata.get("general.name"),
        "file_bytes": h.file_size,
        "tensor_bytes": n_bytes,
        "params": n_params,
        "bits_per_weight": 8 * n_bytes / n_params if n_params else 0.0,
        "tensor_count": len(h.tensors),
        "tensor_types": {name: {"count": n, "bytes": type_bytes[name]} for name, n in types.most_common()},
        "has_chat_template": "tokenizer.chat_template" in h.metadata,
        "metadata": {k: _json_value(v) for k, v in h.metadata.items()},
    }


def _shown(value) -> str:
    if isinstance(value, ArrayInfo):
        return f"[{value.length} x {value.type.name.lower()}]"
    text = f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS - 3] + "..."


def _arch_line(h: GgufHeader) -> str:
    """The hyper-parameters most often asked about, when the architecture records them."""
    keys = [("context", "context_length"), ("embedding", "embedding_length"), ("layers", "block_count"),
            ("heads", "attention.head_count"), ("kv heads", "attention.head_count_kv")]
    parts = [f"{label} {h.metadata[f'{h.architecture}.{key}']}" for label, key in keys
             if f"{h.architecture}.{key}" in h.metadata]
    vocab = h.metadata.get("tokenizer.ggml.tokens")
    if isinstance(vocab, ArrayInfo):
        parts.append(f"vocab {vocab.length}")
    return ", ".join(parts)


def type_table(path, input_bytes: int | None = None) -> str:
    """Per tensor type: count, MiB and bits per weight, largest first; then the total (and the
    input it was made from, for a quantization summary)."""
    h = read_header(path)
    by_type: dict[str, list] = {}
    for t in h.tensors:
        by_type.setdefault(t.type.name, []).append(t)

    def row(label: str, n, tensors_bytes: int, n_elements: int) -> str:
        return f"{label:<8} {n:>7} {tensors_bytes / 2**20:>10.2f} {8 * tensors_bytes / max(n_elements, 1):>7.2f}"

    n_all = sum(t.n_elements for t in h.tensors)
    lines = [f"{'type':<8} {'tensors':>7} {'MiB':>10} {'bits/w':>7}"]
    for name, ts in sorted(by_type.items(), key=lambda kv: -sum(t.n_bytes for t in kv[1])):
        lines.append(row(name, len(ts), sum(t.n_bytes for t in ts), sum(t.n_elements for t in ts)))
    if input_bytes is not None:
        lines.append(row("input", "", input_bytes, n_all))
    lines.append(row("total", len(h.tensors), sum(t.n_bytes for t in h.tensors), n_all) + f"  {h.path}")
    return "\n".join(lines)


def describe(path) -> str:
    """A human summary: architecture, size, tensor types, bits per weight, then the metadata."""
    h = read_header(path)
    info = _summary(h)
    types = ", ".join(f"{name} {t['count']}" for name, t in info["tensor_types"].items())
    lines = [
        f"{info['path']}: GGUF v{info['gguf_version']}, {info['architecture']}"
        + (f" ({info['name']})" if info["name"] else ""),
        f"  {info['params'] / 1e6:.1f}M params, {info['tensor_count']} tensors ({types})",
        f"  {info['tensor_bytes'] / 1e6:.1f} MB of tensor data, {info['bits_per_weight']:.2f} bits/weight, "
        f"file {info['file_bytes'] / 1e6:.1f} MB",
    ]
    if arch := _arch_line(h):
        lines.append(f"  {arch}")
    lines.append(f"  chat template: {'yes' if info['has_chat_template'] else 'no'}")
    lines.append("metadata:")
    lines += [f"  {key} = {_shown(value)}" for key, value in h.metadata.items()]
    return "\n".join(lines)
