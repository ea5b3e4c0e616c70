"""ggufkit: Hugging Face checkpoints -> llama.cpp GGUF -> local runtime and measurements.

Data flows one way: checkpoint (convert) -> tensors -> (imatrix, runtime) -> quantized blocks
(kquants, types by mixtures) -> GGUF (gguffile) -> runtime. Imports point down the layers only:
cli -> commands -> convert | runtime -> mixtures -> kquants, gguffile, models, errors, progress
(tests/test_layers.py checks it)."""

__version__ = "0.1.0"
