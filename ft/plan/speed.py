"""The time model: FLOPs per token of a training step or a forward, and the fixed cost of each micro-batch on a GPU.
Pure arithmetic on a `Step` and a `GPU`. `Context.train_seconds` (ft/plan/phases.py) turns them into seconds at the
GPU's utilisation (see ft/plan/hardware.py for where each utilisation comes from)."""

from __future__ import annotations

from ft.plan.hardware import GPU
from ft.plan.memory import NF4_DQ_BITS, Step


def flops_per_token(s: Step, *, recompute: bool | None = None) -> float:
    """FLOPs per token of a training step (forward + backward [+ recomputed forward]) or of a forward (train=False).

    The frozen base costs 2N forward and 2N backward (input gradients only: no weight gradient); LoRA 2 forward,
    4 backward per adapter parameter; attention 4 * context * hidden per layer forward, twice that backward, with
    the full context under an explicit mask (SDPA's masked kernels compute every tile), half of it when causal;
    the fused head 2*h*V forward, 4*h*V backward (the tiles are recomputed).
    """
    m = s.shape
    n = m.linear_params()
    lora = m.lora_params(s.targets, s.r) * s.trainable_adapters
    context = s.length if s.masked else s.length / 2
    attention = 4 * context * m.q_dim * m.layers
    head = 0 if s.head in ("score", "none") else 2 * m.hidden * m.vocab
    forward = 2 * n + 2 * lora + attention + head
    if not s.train:
        return forward
    backward = 2 * n + 4 * lora + 2 * attention + 2 * head
    recompute = s.checkpointing if recompute is None else recompute
    return forward + backward + (2 * n + 2 * lora + attention if recompute else 0)


LAUNCH_SECONDS = 0.5e-3  # per layer and pass: kernel launches and Python in HF + PEFT + bitsandbytes (assumption)


def fixed_seconds(s: Step, gpu: GPU) -> float:
    """Per micro-batch, whatever its length: bitsandbytes dequantises every weight in each pass (read the packed
    weight, write and read back the 16-bit copy), at ~70% of the memory bandwidth; plus launch overheads."""
    passes = 1 if not s.train else (3 if s.checkpointing else 2)
    seconds = passes * s.shape.layers * LAUNCH_SECONDS
    if s.quantised and gpu.bandwidth:
        per_param = (NF4_DQ_BITS / 8 if s.quantization == "4bit" else 1) + 2 * s.compute_bytes
        seconds += passes * s.shape.linear_params() * per_param / (gpu.bandwidth * 1e9 * 0.7)
    return seconds

