"""The GPUs plan knows (memory, peak fp16/bf16 TFLOPS, memory bandwidth, and the fraction of that peak QLoRA training
reaches, every figure cited) and `--gpu` parsing. Data only: no device is queried here."""

from __future__ import annotations

from dataclasses import dataclass

from ft.errors import UserError
from ft.plan.memory import GiB


@dataclass(frozen=True)
class GPU:
    """A GPU as plan sees it."""

    key: str
    label: str
    memory: int  # bytes the CUDA driver reports as total (torch.cuda.get_device_properties().total_memory)
    tflops: float | None  # peak dense fp16/bf16 tensor-core TFLOPS (fp32 accumulate), from the vendor's sheet
    bf16: bool = True
    bandwidth: float | None = None  # GB/s
    utilisation: float | None = None  # realistic fraction of `tflops` for HF + bitsandbytes QLoRA training
    source: str = ""


def _gib(x: float) -> int:
    return int(x * GiB)


# Memory: what torch reports as total_memory; where a published run printed it, that figure (Unsloth's notebooks
# print `total_memory / 1024**3` as "Max memory": Tesla T4 14.748, NVIDIA L4 22.168, A100-SXM4-40GB 39.394-39.557),
# otherwise the nominal size less the ~1.5% the driver keeps (an estimate).
# Peak dense fp16/bf16 tensor TFLOPS (no sparsity): NVIDIA datasheets (T4 65 "mixed precision"; L4 121 (242
# sparse); A10 125; V100 SXM2 125; A100 312; H100 SXM 989; H200 989; L40S 362) and whitepapers (GA102: RTX 3090
# 71 with fp32 accumulate; AD102: RTX 4090 165.2 with fp32 accumulate). AWS publishes no separate tensor figure
# for its A10G; the A10's is used.
# Utilisation: the fraction of that peak HF + PEFT + bitsandbytes QLoRA training reaches on the FLOPs of
# `flops_per_token` (recomputation included), once the fixed per-micro-batch cost (`fixed_seconds`) is taken out.
# Two are derived from published measurements (the arithmetic is in tests/test_plan.py); the others are
# assumptions by analogy and say so:
#   T4 0.11: Unsloth's README (Dec 2023, "Performance comparisons on 1 Tesla T4 GPU", its Hugging Face baseline:
#     QLoRA of Llama 2 7B, bsz 2, ga 4, adamw_8bit): Alpaca (51,760 rows) in 23 h 15 m for one epoch, 3.23 s per
#     micro-batch of 2 rows. At ~250 tokens per row (Alpaca prompt template + answer, padded in pairs: our
#     estimate) and 40.5 GFLOP per token with recomputation, less 0.44 s of fixed cost: 7.2 TFLOPS, 11% of 65.
#   A100 0.35: LLaMA-Factory's comparison with Unsloth (README, Dec 2023): Hugging Face 4-bit QLoRA of Llama 2 7B
#     on one A100, batch 4, cutoff 1,024, LoRA rank 8 (q, v), gradient checkpointing (its default): 2,415
#     tokens/s, i.e. 1.70 s per 4,096-token micro-batch; at 41.8 GFLOP per token, less 0.13 s fixed: 35% of 312.
GPUS: dict[str, GPU] = {g.key: g for g in [
    GPU("t4", "NVIDIA T4 16 GB", _gib(14.748), 65, bf16=False, bandwidth=320, utilisation=0.11,
        source="derived from Unsloth's Hugging Face baseline on a T4"),
    GPU("l4", "NVIDIA L4 24 GB", _gib(22.168), 121, bandwidth=300, utilisation=0.15,
        source="assumed: a 72 W card, power-limited like the T4"),
    GPU("a10g", "NVIDIA A10G 24 GB", _gib(22.1), 125, bandwidth=600, utilisation=0.25, source="assumed"),
    GPU("v100", "NVIDIA V100 16 GB", _gib(15.77), 125, bf16=False, bandwidth=900, utilisation=0.25,
        source="assumed"),
    GPU("v100-32g", "NVIDIA V100 32 GB", _gib(31.74), 125, bf16=False, bandwidth=900, utilisation=0.25,
        source="assumed"),
    GPU("rtx3090", "NVIDIA RTX 3090 24 GB", _gib(23.69), 71, bandwidth=936, utilisation=0.30, source="assumed"),
    GPU("rtx4090", "NVIDIA RTX 4090 24 GB", _gib(23.65), 165.2, bandwidth=1008, utilisation=0.25,
        source="assumed"),
    GPU("a100-40g", "NVIDIA A100 40 GB", _gib(39.39), 312, bandwidth=1555, utilisation=0.35,
        source="derived from LLaMA-Factory's Hugging Face QLoRA figure on an A100"),
    GPU("l40s", "NVIDIA L40S 48 GB", _gib(44.4), 362, bandwidth=864, utilisation=0.20, source="assumed"),
    GPU("a100-80g", "NVIDIA A100 80 GB", _gib(79.15), 312, bandwidth=2039, utilisation=0.35,
        source="as the A100 40 GB"),
    GPU("h100", "NVIDIA H100 SXM 80 GB", _gib(79.1), 989, bandwidth=3350, utilisation=0.20,
        source="assumed: bitsandbytes dequantisation and Python overheads do not scale with Hopper's tensor cores"),
    GPU("h200", "NVIDIA H200 141 GB", _gib(139.8), 989, bandwidth=4800, utilisation=0.20, source="as the H100"),
]}


def parse_gpu(text: str) -> GPU:
    """--gpu: a known name (t4, a100-80g, ...) or a plain number of GiB (memory only: no time estimate)."""
    key = text.strip().lower().replace("_", "-").removeprefix("nvidia-").replace("gb", "g")
    key = {"a100": "a100-40g", "a100-40": "a100-40g", "a100-80": "a100-80g", "v100-16g": "v100", "h100-80g": "h100",
           "3090": "rtx3090", "4090": "rtx4090", "rtx-3090": "rtx3090", "rtx-4090": "rtx4090"}.get(key, key)
    if key in GPUS:
        return GPUS[key]
    try:
        gib = float(text.strip().lower().removesuffix("gib").removesuffix("gb"))
    except ValueError:
        gib = None
    if gib is None or not 0 < gib < 10_000:
        raise UserError(f"--gpu {text}: unknown GPU; give one of {', '.join(GPUS)}, or its memory in GiB (e.g. --gpu 24)")
    return GPU(f"{gib:g}gib", f"a GPU with {gib:g} GiB", _gib(gib), None, source="memory only")
