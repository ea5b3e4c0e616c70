"""Quantization-aware training onto GGUF grids: fake quantization that rounds exactly as `convert`
writes (fakequant), and distillation from the original model (train). Needs torch and transformers."""
