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


@pytest.mark.parametrize("upcast_frozen", [False, True])
def test_bfloat16_training_keeps_the_frozen_weights_and_checkpoints_16_bit(tiny_dir, upcast_frozen):
    """model.dtype: bfloat16 (the CPU stand-in for a GPU's 16-bit compute): the 4-bit base's embeddings, LM head and
    norms stay bfloat16 and so does every gradient-checkpoint tensor (float32 with model.upcast_frozen: true);
    LoRA weights, the logits and the loss are float32 either way, and the gradients reach every LoRA weight."""
    frozen = torch.float32 if upcast_frozen else torch.bfloat16
    base = models.load_model(TINY.model_copy(update={"dtype": "bfloat16"}))
    model = models.attach_lora(base, LoraSection(r=4, alpha=8), gradient_checkpointing=True,
                               upcast_frozen=upcast_frozen)
    model.train()
    params = dict(model.named_parameters())
    assert model.get_input_embeddings().weight.dtype == model.get_output_embeddings().weight.dtype == frozen
    norms = {p.dtype for n, p in params.items() if "norm" in n}
    assert norms == {frozen}
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert all(not p.requires_grad for n, p in params.items() if "lora_" not in n)
    config = model.config
    ids = torch.randint(3, config.vocab_size, (2, 24))
    hidden = []  # (dtype) of each saved (batch, tokens, hidden) tensor: the checkpoints and the final norm's input

    def pack(t):
        if tuple(t.shape) == (2, 24, config.hidden_size):
            hidden.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == out.loss.dtype == torch.float32
    # one checkpoint per decoder layer in the residual stream's dtype, and the final norm's float32 copy of its input
    assert hidden.count(frozen) >= config.num_hidden_layers
    assert set(hidden) <= {frozen, torch.float32}
    if not upcast_frozen:
        assert hidden.count(torch.bfloat16) == config.num_hidden_layers
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in params.items() if "lora_" in n)
