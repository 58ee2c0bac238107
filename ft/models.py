"""Model and tokenizer loading: the only place that calls from_pretrained, BitsAndBytesConfig, LoraConfig.

Defaults are the QLoRA ones that fit a 16 GB T4: the frozen base in 4-bit NF4 with double
quantisation, compute in float16 on GPUs without bfloat16 (T4), bfloat16 where supported,
float32 on the CPU; LoRA weights kept in float32; non-reentrant gradient checkpointing; SDPA
attention. `trust_remote_code` is False unless a recipe sets `model.trust_remote_code: true`, and then a
warning says so every time a checkpoint is loaded with it.

Llama 2 has no pad token. We pad with <unk> (id 0): it is in the vocabulary (no embedding
resize, which a 4-bit model cannot do cleanly), it never appears in chat data, and it is not
EOS, so EOS stays in the labels and the model learns to stop. Padded positions are masked
out of attention and loss anyway.
"""

from __future__ import annotations

from pathlib import Path

from ft import chat_format, tiny
from ft.errors import UserError
from ft.recipe import LoraSection, ModelSection


def resolve(name: str) -> str:
    """A local folder, the built-in tiny model (built on first use), or a Hub id, as a from_pretrained argument."""
    if name == tiny.NAME:
        return str(tiny.path())
    if name.startswith("builtin:"):
        raise UserError(f"model.name: unknown built-in model {name!r} (available: {tiny.NAME})")
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model {name!r}: the folder has no config.json; it is not a model checkpoint")
        return str(local)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model {name!r}: no such folder, and not a Hub id of the form owner/name")
    return name


def local_checkpoint(name: str) -> Path:
    """The checkpoint as a local folder: a folder or the built-in model as is, a Hub id through the Hub cache."""
    resolved = resolve(name)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as e:  # offline, gated, missing: huggingface_hub raises several types
        raise UserError(f"model {name!r}: cannot fetch it from the Hub ({type(e).__name__}: {_first_line(e)})") from None


def compute_dtype(requested: str = "auto"):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(name: str, *, padding_side: str = "right", trust_remote_code: bool = False):
    """The tokenizer with the Llama 2 chat template set and checked, and <unk> as the pad token."""
    from transformers import AutoTokenizer

    folder = Path(name).expanduser()
    source = str(folder) if (folder / "tokenizer_config.json").is_file() else resolve(name)  # a run folder has no config.json
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, legacy=True, trust_remote_code=_trust(name, trust_remote_code))
    except OSError as e:
        raise UserError(f"model {name!r}: cannot load its tokenizer ({_first_line(e)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"model {name!r}: its pad token is EOS; the model would never learn to stop")
    tokenizer.padding_side = padding_side
    chat_format.apply(tokenizer)
    return tokenizer


def quantization_config(model: ModelSection):
    import torch
    from transformers import BitsAndBytesConfig

    if model.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(model.dtype),
            bnb_4bit_quant_storage=torch.uint8,
        )
    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(model: ModelSection, *, quantization: str | None = None, reward: bool = False):
    """The base causal LM (or, with reward=True, the base with a scalar score head), quantised as the
    recipe says (or as `quantization` overrides)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    section = model.model_copy(update={"quantization": quantization or model.quantization})
    dtype = compute_dtype(section.dtype)
    if torch.cuda.is_available():
        import os

        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    else:
        device_map = {"": "cpu"}
    extra = {"num_labels": 1, "pad_token_id": 0} if reward else {}  # Llama 2 pads with <unk> = 0 here
    try:
        return (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_pretrained(
            resolve(section.name),
            **extra,
            quantization_config=quantization_config(section),
            dtype=dtype,
            device_map=device_map,
            attn_implementation=section.attn_implementation,
            trust_remote_code=_trust(section.name, section.trust_remote_code),
        )
    except OSError as e:
        raise UserError(f"model {section.name!r}: cannot load it ({_first_line(e)})") from None


def lora_config(lora: LoraSection, *, reward: bool = False):
    """LoRA on the recipe's projections; for a reward model the score head is trained and saved in full."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="SEQ_CLS" if reward else "CAUSAL_LM",
        modules_to_save=["score"] if reward else None,
    )


def attach_lora(base, lora: LoraSection, *, adapter: str | None = None, gradient_checkpointing: bool = True,
                reward: bool = False):
    """Make `base` trainable through LoRA: a new adapter, or an earlier run's adapter to continue.

    For a quantised base, peft's prepare_model_for_kbit_training freezes it, keeps norms and the
    head in float32 and turns on (non-reentrant) gradient checkpointing.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        base.enable_input_require_grads()
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"model.adapter: {adapter!r} has no adapter_config.json (expected an llama-ft run folder)")
        model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(lora, reward=reward))
    keep_lora_float32(model)
    return model


def align_special_tokens(model, tokenizer) -> None:
    """The tokenizer's pad/bos/eos ids into the model config and generation config, before a trainer would do it
    and announce it (transformers' align_special_tokens, same rules): llama-ft pads with <unk> (id 0), which
    Llama 2's config leaves unset. A list of EOS ids keeps its other stop ids."""
    configs = [model.config, getattr(model, "generation_config", None)]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is None:
            continue
        for config in filter(None, configs):
            current = getattr(config, name, None)
            if isinstance(current, list):
                if value not in current:
                    setattr(config, name, [value, *current])
            else:
                setattr(config, name, value)


def keep_lora_float32(model) -> None:
    """Trainable (LoRA) weights in float32: float16 updates of small weights underflow on a T4."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _trust(name: str, trust_remote_code: bool) -> bool:
    if trust_remote_code:
        import sys

        print(f"warning: model.trust_remote_code is true: Python code shipped with {name!r} may run on this machine "
              "with your permissions. Llama 2 needs none; keep it only for a repository you trust.",
              file=sys.stderr, flush=True)
    return trust_remote_code


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
