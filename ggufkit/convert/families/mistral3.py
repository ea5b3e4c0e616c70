"""Mistral Small 3.1 / 3.2 and Ministral 3 (Mistral3ForConditionalGeneration): the text model, Llama's
layout and tokenizer handling under llama.cpp's mistral3 architecture; Ministral 3's YaRN settings
(mscale_all_dim, llama_4_scaling_beta) as llama.cpp's converter writes them."""

from __future__ import annotations

import gguf

from ggufkit.convert.families.base import ImageTextModel, register
from ggufkit.convert.families.llama import Llama
from ggufkit.errors import GgufkitError


@register("Mistral3ForConditionalGeneration")
class Mistral3(ImageTextModel, Llama):
    arch = gguf.MODEL_ARCH.MISTRAL3
    hf_model_type = "mistral"

    def __init__(self, config: dict):
        super().__init__(config)
        if self.config.get("model_type") == "mistral4":  # llama.cpp's converter makes it a DeepSeek-V2 model
            raise GgufkitError("Mistral 4 (multi-head latent attention, mixture of experts) is not supported")

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        if self.config.get("model_type") == "ministral3":  # the text model's type
            w.add_rope_scaling_yarn_log_mul(self.rope["mscale_all_dim"])
            w.add_attn_temperature_scale(self.rope["llama_4_scaling_beta"])

    @classmethod
    def config_from_gguf(cls, kv: dict, n_vocab: int, tied: bool) -> dict:
        if f"{cls.arch_name()}.attention.temperature_scale" in kv:
            raise GgufkitError("export-hf of Ministral 3 is not supported: MistralForCausalLM has no "
                               "llama_4_scaling_beta attention scaling")
        # the GGUF holds no vision tower: export-hf writes the text model alone
        return {**super().config_from_gguf(kv, n_vocab, tied), "architectures": ["MistralForCausalLM"]}
