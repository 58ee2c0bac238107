"""Model loading: 4-bit NF4 with double quantisation, dtype by hardware, LoRA in float32, no remote code."""

import pytest
import torch

from ft import models
from ft.errors import UserError
from ft.recipe import LoraSection, ModelSection

TINY = ModelSection(name="builtin:tiny-llama-2")


def test_compute_dtype_on_cpu_is_float32_and_overridable():
    assert models.compute_dtype("auto") == torch.float32  # the test machine has no GPU
    assert models.compute_dtype("float16") == torch.float16


def test_quantization_config_is_qlora_nf4_double_quant():
    config = models.quantization_config(ModelSection(name="x", dtype="float16"))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert models.quantization_config(ModelSection(name="x", quantization="8bit")).load_in_8bit
    assert models.quantization_config(ModelSection(name="x", quantization="none")) is None


def test_4bit_model_with_lora_trains_float32_adapters_only(tiny_dir):
    import bitsandbytes as bnb

    base = models.load_model(TINY)
    assert isinstance(base.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert base.config.num_key_value_heads < base.config.num_attention_heads  # GQA, as in 70B
    assert base.config._attn_implementation == "sdpa"
    model = models.attach_lora(base, LoraSection(r=4, alpha=8), gradient_checkpointing=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {n.split(".")[-4] for n in trainable} == set(LoraSection().target_modules)
    assert model.base_model.model.is_gradient_checkpointing


def test_resolve_rejects_what_is_neither_a_folder_nor_a_hub_id(tmp_path):
    with pytest.raises(UserError, match="not a Hub id"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(UserError, match="unknown built-in model"):
        models.resolve("builtin:huge")
    assert models.resolve("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_hub_model_offline_is_a_user_error():
    with pytest.raises(UserError, match="meta-llama/Llama-2-7b-hf"):
        models.load_tokenizer("meta-llama/Llama-2-7b-hf")


def test_pad_token_is_unk_not_eos(tokenizer):
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
