"""ggufkit: Hugging Face checkpoints -> llama.cpp GGUF -> local runtime and measurements.

Data flows one way: checkpoint (convert) -> tensors -> (imatrix) -> quantized blocks (kquants)
-> GGUF (convert.writer) -> runtime.
"""

__version__ = "0.1.0"
