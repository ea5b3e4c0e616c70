"""`ggufkit convert` vs llama.cpp's convert_hf_to_gguf.py on a mixture-of-experts checkpoint of about
2 GB, in one run: wall time and peak RSS ratios (goal: <= 0.7x time, <= 0.5x RSS), and whether both
outputs hold the same tensor bytes.

The checkpoint is Mixtral's layout at Qwen3-30B-A3B's width (hidden 2048, 32 experts of 768, 4 per
token) in 5 layers, with random weights built by transformers and saved in bf16 (cached in
~/.cache/ggufkit/bench/moe-2g), and SmolLM2's tokenizer: its 49k vocabulary leaves the experts three
quarters of the bytes (Qwen3-MoE would take Qwen2's 151k one, as in the tests).

    nice -n 10 python -m benchmarks.moe_convert_speed [--types BF16 Q8_0] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import race_converters, table
from ggufkit import models

CONFIG = dict(hidden_size=2048, intermediate_size=768, num_local_experts=32, num_experts_per_tok=4,
              num_hidden_layers=5, num_attention_heads=16, num_key_value_heads=4, vocab_size=49152,
              max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)


def build(folder: Path) -> None:
    """The checkpoint, in `folder`: run in a child of its own (see checkpoint)."""
    import torch
    import transformers

    from ggufkit.convert.export_hf import write_tokenizer
    from ggufkit.gguffile.reader import read_header

    config = transformers.MixtralConfig(**CONFIG)
    config.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    write_tokenizer(folder, read_header(models.fetch(models.SMOLLM2), arrays=True).metadata)


def checkpoint() -> Path:
    """The cached checkpoint, built once. In a child: torch's memory in this process would count in
    every measured child's peak RSS."""
    folder = models.cache_dir() / "bench" / "moe-2g"
    if not (folder / "config.json").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "benchmarks.moe_convert_speed", "--build", str(partial)], check=True)
        partial.rename(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["BF16", "Q8_0"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build(args.build)
        return
    hf = checkpoint()
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**30
    with tempfile.TemporaryDirectory(dir=models.cache_dir()) as tmp:
        tmp = Path(tmp)
        rows = race_converters(hf, args.types, tmp)
        # only now: reading the outputs grows this process, which the measured children count
        from reference.quantize import identical_tensors

        differ = {}
        for row in rows:
            fraction, differ[row["type"]] = identical_tensors(tmp / f"ours-{row['type']}.gguf",
                                                              tmp / f"ref-{row['type']}.gguf")
            row["same_bytes"] = f"{fraction:.0%}"
    if args.json:
        print(json.dumps({"checkpoint_gb": round(size, 2), "rows": rows, "differ": differ}, indent=2))
    else:
        print(f"checkpoint: {hf} ({size:.2f} GB of bf16 safetensors)")
        print(table(rows, list(rows[0])))
        for qtype, names in differ.items():
            if names:
                print(f"{qtype}: {len(names)} tensors differ, e.g. {names[:3]}")
    if any(differ.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
