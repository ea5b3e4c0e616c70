"""A short human summary of a GGUF file."""

from collections import Counter
from pathlib import Path

from ggufkit.convert.export_hf import open_gguf


def describe(path) -> str:
    r = open_gguf(Path(path))
    types = Counter(t.tensor_type.name for t in r.tensors)
    n = sum(int(t.n_elements) for t in r.tensors)
    size = sum(int(t.n_bytes) for t in r.tensors)
    arch = r.fields["general.architecture"].contents()
    return (f"{path}: {arch}, {len(r.tensors)} tensors ({', '.join(f'{k} {v}' for k, v in types.most_common())}), "
            f"{n / 1e6:.1f}M params, {size / 1e6:.1f} MB, {8 * size / n:.2f} bits/weight")
