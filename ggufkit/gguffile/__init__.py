"""The GGUF file layer, below everything that reads or writes one: the strict reader (`reader`), the
streaming atomic writer (`writer`), the importance-matrix file formats (`imatrix`) and
llama-gguf-split's conventions (`split`). It knows the format, not what the tensors mean."""
