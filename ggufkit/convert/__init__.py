"""Checkpoint -> tensors -> GGUF: reading HF checkpoints, per-family transforms, tokenizers, and the
streaming GGUF writer; plus the way back (export-hf)."""
