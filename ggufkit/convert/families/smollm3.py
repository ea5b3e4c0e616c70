"""SmolLM3: Llama's layout and tokenizer handling; every fourth layer without RoPE (NoPE), the
pattern llama.cpp hard-codes."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import register
from ggufkit.convert.families.llama import Llama
from ggufkit.errors import GgufkitError

NO_ROPE_STEP = 4  # llama.cpp: layer i uses RoPE unless (i + 1) % 4 == 0


@register("SmolLM3ForCausalLM")
class SmolLM3(Llama):
    arch = gguf.MODEL_ARCH.SMOLLM3
    hf_model_type = "smollm3"
    derived_head_dim = False  # transformers' SmolLM3Config has no head_dim

    def __init__(self, config: dict):
        super().__init__(config)
        pattern = [int((i + 1) % NO_ROPE_STEP != 0) for i in range(self.n_layer)]
        if self.config.get("no_rope_layers") not in (None, pattern):
            raise GgufkitError(f"no_rope_layers {self.config['no_rope_layers']} is not llama.cpp's fixed pattern "
                               f"(RoPE off in every {NO_ROPE_STEP}th layer): {pattern}")

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        cfg = super().config_from_gguf(kv, n_vocab, tied)
        cfg.update(no_rope_layer_interval=NO_ROPE_STEP, use_sliding_window=False,
                   no_rope_layers=[int((i + 1) % NO_ROPE_STEP != 0) for i in range(cfg["num_hidden_layers"])])
        return cfg
