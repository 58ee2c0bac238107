"""The memory check a training stage runs before it loads a model: plan the recipe against this GPU's free memory,
and stop with the plan's advice when it clearly does not fit. The only part of ft.plan that imports torch."""

from __future__ import annotations

from ft.errors import UserError
from ft.plan.advice import advise
from ft.plan.hardware import GPU
from ft.plan.memory import CUDA_CONTEXT, GiB
from ft.plan.phases import PhaseKind
from ft.plan.planner import Plan, make  # without advice: check asks for it only when the GPU is too small
from ft.recipe import Recipe

MARGIN = 0.10  # refuse only when the plan's peak exceeds free memory by more than this (the planner's error band)


def check_before_training(recipe: Recipe, *, force: bool = False, skip: tuple[PhaseKind, ...] = (),
                          log=print) -> Plan | None:
    """On a GPU, plan the recipe against the device's free memory; stop (UserError, exit 2) with the plan's advice
    when the peak exceeds it by a clear margin, unless `force`. Skipped on the CPU."""
    import torch  # here only: `llama-ft plan` and the rest of ft.plan run without torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    here = GPU("this-gpu", f"{name}, {free / GiB:.1f} GiB free", free + CUDA_CONTEXT, None,
               bf16=torch.cuda.is_bf16_supported(), source="this device")
    try:
        plan = make(recipe, here, skip=skip)
    except UserError as e:
        log(f"note: memory check skipped: {e}")
        return None
    need = plan.peak_bytes - CUDA_CONTEXT
    if need <= free * (1 + MARGIN):
        return plan
    text = (f"the plan's peak is {need / GiB:.1f} GiB of GPU memory ({plan.peak_phase.name}), but {name} has "
            f"{free / GiB:.1f} GiB free")
    if force:
        log(f"warning: {text}; training anyway (--force)")
        return plan
    plan.advice = advise(recipe, here, plan, skip=skip)
    lines = [text + ". Changes that fit (add them to the command):"]
    for a in plan.advice:
        if a["set"]:
            lines.append(f"  {a['change']}: {' '.join('--set ' + x for x in a['set'])} ({a['peak_bytes'] / GiB:.1f} GiB)")
    lines.append("See `llama-ft plan RECIPE --gpu ...` for the breakdown, or pass --force to train anyway.")
    raise UserError("\n".join(lines))
