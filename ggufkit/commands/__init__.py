"""The user-facing pipelines that join the middle parts: `convert` (a checkpoint, through llama.cpp
for --calibration), `quantize` (GGUF -> GGUF), `demo` (the main job). They own no file format and no
numerics; the CLI parses arguments and calls one function here or in a part below."""
