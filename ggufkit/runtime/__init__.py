"""Running and measuring GGUF files through llama-cpp-python."""
