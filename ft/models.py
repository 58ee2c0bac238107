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

from ft import chat_format, distributed, runs, tiny
from ft.errors import UserError, first_line
from ft.hub_id import is_hub_id
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
    if not is_hub_id(name):
        raise UserError(f"model {name!r}: no such folder, and not a Hub id of the form owner/name")
    return name


def checkpoint_id(name: str) -> str:
    """One spelling per checkpoint, to tell whether two names mean the same weights: a local folder (or the built-in
    model) by its absolute path, else the Hub id."""
    path = Path(resolve(name)).expanduser()
    return str(path.resolve()) if path.exists() else name


def local_checkpoint(name: str) -> Path:
    """The checkpoint as a local folder: a folder or the built-in model as is, a Hub id through the Hub cache."""
    resolved = resolve(name)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as e:  # offline, gated, missing: huggingface_hub raises several types
        raise UserError(f"model {name!r}: cannot fetch it from the Hub ({type(e).__name__}: {first_line(e)})") from None


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
        raise UserError(f"model {name!r}: cannot load its tokenizer ({first_line(e)})") from None
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
            # FSDP and ZeRO-3 shard only floating-point tensors: there the packed 4-bit weights are stored in the
            # compute dtype (bitsandbytes' FSDP-QLoRA guide); one GPU or DDP keeps plain bytes
            bnb_4bit_quant_storage=compute_dtype(model.dtype) if distributed.is_sharded() else torch.uint8,
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
    if distributed.is_sharded():
        device_map = None  # FSDP / ZeRO-3 place and shard the weights themselves
    elif torch.cuda.is_available():
        device_map = {"": distributed.local_rank()}  # one GPU, or this process's GPU under DDP
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
        raise UserError(f"model {section.name!r}: cannot load it ({first_line(e)})") from None


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
                reward: bool = False, upcast_frozen: bool = False):
    """Make `base` trainable through LoRA: a new adapter, or an earlier run's adapter to continue.

    A quantised base is frozen as it was loaded: NF4/int8 projections, and the embeddings, norms and LM head in
    the compute dtype (see freeze_as_loaded), with (non-reentrant) gradient checkpointing. `upcast_frozen`
    (model.upcast_frozen) takes peft's prepare_model_for_kbit_training instead, which upcasts those to float32.
    LoRA weights (and a reward model's score head) are float32 either way.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    sharded = distributed.is_sharded()
    ckpt_kwargs = {"use_reentrant": sharded}  # reentrant under FSDP / ZeRO-3, as PEFT's guides run them
    exact_4bit_kernels(base)
    quantized = getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    if quantized and upcast_frozen and not sharded:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    else:
        # Under FSDP / ZeRO-3 too the base stays in its storage dtype (each FSDP unit must hold one dtype), as TRL
        # does for "sharded QLoRA"; only the LoRA weights are float32 (they form units of their own).
        freeze_as_loaded(base, gradient_checkpointing=gradient_checkpointing, ckpt_kwargs=ckpt_kwargs)
    if adapter and reward and not _saves_score_head(adapter):
        # An SFT adapter continued as a reward model: its LoRA weights, plus a new score head trained and saved
        # with it (loading it as is would keep a random, frozen head that is never saved).
        model = get_peft_model(base, lora_config(runs.lora_shape(adapter, "model.adapter"), reward=True))
        _load_adapter_weights(model, adapter, "default")
    elif adapter:
        model = load_adapter(base, adapter, trainable=True, what="model.adapter")
    else:
        model = get_peft_model(base, lora_config(lora, reward=reward))
    keep_lora_float32(model)
    float32_outputs(model)
    return model


def freeze_as_loaded(base, *, gradient_checkpointing: bool, ckpt_kwargs: dict) -> None:
    """What prepare_model_for_kbit_training does for LoRA, without its float32 upcast: every base weight frozen as
    loaded, so the embeddings, norms and LM head stay in the compute dtype (float16 on a T4, bfloat16 where supported)
    and so does the residual stream and every tensor gradient checkpointing keeps, 2 bytes per hidden unit instead
    of 4. Llama's RMSNorm computes its statistics in float32 itself and returns the input dtype; LoRA layers cast
    their input to their float32 weights (peft) and back; float32_outputs keeps the logits and the loss float32."""
    for param in base.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        base.enable_input_require_grads()  # the checkpointed layers' input must carry a gradient to reach LoRA


def float32_outputs(model) -> None:
    """The LM head's logits in float32 (log-softmax and loss then run in float32, as TRL's log-prob path does; a
    no-op where the head already is float32), and a trained float32 head (a reward model's score) fed float32:
    without autocast (the CPU), a 16-bit residual stream would not multiply with it."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight.dtype != torch.float32:
        head.register_forward_hook(lambda module, args, output: output.float())
    for name, module in model.named_modules():  # LoRA's own layers cast their input themselves
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and module.weight.dtype == torch.float32 \
                and module.weight.requires_grad:
            module.register_forward_pre_hook(lambda module, args: tuple(
                a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args))


def load_adapter(base, folder: str | Path, *, trainable: bool = False, what: str = "adapter"):
    """`base` with a saved LoRA adapter (a run folder, checkpoint or adapter folder) as a PeftModel; frozen unless
    `trainable`. An adapter made for another model is a UserError naming `what` (the flag or key it came from)."""
    from peft import PeftModel

    runs.adapter_config(folder, what)  # a missing adapter is named by where it came from
    try:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        name = getattr(base.config, "_name_or_path", "the base model")
        raise UserError(f"{what} {folder} does not fit model {name!r}: {first_line(e)}") from None


# ---------------------------------------------------------------- several adapters on one base (PPO, rejection)

SCORE_KEY = "base_model.model.score.weight"  # where a reward run's adapter file keeps its score head


def add_adapter(model, name: str, *, lora: LoraSection | None = None, run_dir: str | None = None,
                copy_of: str | None = None, trainable: bool = False):
    """Add the LoRA adapter `name` to a PeftModel that already has one: new (`lora`), an earlier run's
    (`run_dir`; a reward run's score head is returned), or a copy of the loaded adapter `copy_of`.

    The new adapter is not made active, and the other adapters keep their requires_grad: peft's
    add_adapter/set_adapter would otherwise mark only one adapter trainable.
    """
    import torch

    before = {n: p.requires_grad for n, p in model.named_parameters()}
    head = None
    if copy_of is not None:
        model.add_adapter(name, model.peft_config[copy_of])
        params = dict(model.named_parameters())
        with torch.no_grad():
            for param_name, param in params.items():
                if f".{copy_of}." in param_name:
                    params[param_name.replace(f".{copy_of}.", f".{name}.")].copy_(param)
    elif run_dir is not None:
        config = lora_config(runs.lora_shape(run_dir))
        model.add_adapter(name, config)
        head = _load_adapter_weights(model, run_dir, name)
    else:
        model.add_adapter(name, lora_config(lora))
    for param_name, param in model.named_parameters():
        param.requires_grad = before.get(param_name, trainable)
        if f".{name}." in param_name:
            param.requires_grad = trainable
    keep_lora_float32(model)
    return head


def _load_adapter_weights(model, run_dir: str, name: str):
    """Load a run's adapter_model.safetensors into adapter `name`; returns the score head weight if it has one."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(run_dir) / "adapter_model.safetensors"))
    head = weights.pop(SCORE_KEY, None)
    state = get_peft_model_state_dict(model, adapter_name=name)  # what the file lacks (a new score head) stays as it is
    unknown = [k for k in weights if k not in state]
    state.update(weights)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = unknown + [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise UserError(f"{run_dir}: its adapter does not fit this base model ({unexpected[0]} ...)")
    return head


def _saves_score_head(run_dir: str) -> bool:
    return "score" in (runs.adapter_config(run_dir, "model.adapter").get("modules_to_save") or [])


class use_adapter:
    """`with use_adapter(model, name):` runs the PeftModel with adapter `name` active, then switches back.

    Unlike a plain peft set_adapter, which makes the selected adapter trainable and freezes every other
    one, requires_grad stays exactly as it was: switching to a frozen reference or reward adapter for a
    forward pass never unfreezes it, nor freezes the policy being trained.
    """

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __enter__(self):
        self.previous = self.model.active_adapter
        self._switch(self.name)
        return self.model

    def __exit__(self, *exc):
        self._switch(self.previous)

    def _switch(self, name: str) -> None:
        if self.model.active_adapter == name:
            return
        grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.model.set_adapter(name)
        for n, p in self.model.named_parameters():
            p.requires_grad = grads[n]


def exact_4bit_kernels(model) -> None:
    """Keep bitsandbytes' dequantise-then-matmul path for the 4-bit layers on the CPU.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weights into an inference-only layout
    at its first forward pass in eval mode, for good. Every later forward, in training too, then runs through
    gemv_4bit, which (1) has no autograd kernel, so no gradient flows back through the frozen layers (torch warns
    "an autograd kernel was not registered ... silently incorrect") and the LoRA layers below them get wrong
    gradients: a model that generates and then trains (PPO, RLOO/GRPO) is hit; and (2) computes in bfloat16, so
    the same reward model would score ~1e-3 differently alone (`llama-ft score`) and on PPO's shared base.
    GPUs are not affected.
    """
    import torch

    if torch.cuda.is_available():
        return
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
