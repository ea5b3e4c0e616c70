"""The Hugging Face side: checkpoints (folders, hub ids, packed formats), per-family transforms,
tokenizers, exact grid fitting of prequantized weights, the checkpoint -> GGUF pipeline, and the way
back (export-hf)."""
