"""The memory check a training stage runs before it loads a model: plan the recipe against this GPU's free memory,
and stop with the plan's advice when it clearly does not fit. The only part of ft.plan that imports torch."""

from __future__ import annotations

from ft.errors import UserError
from ft.plan import auto
from ft.plan.auto import MARGIN  # refuse only past free memory x (1 + MARGIN); auto plans below x (1 - MARGIN)
from ft.plan.advice import advise
from ft.plan.hardware import GPU
from ft.plan.memory import CUDA_CONTEXT, GiB
from ft.plan.phases import PhaseKind
from ft.plan.planner import Plan, make  # without advice: check asks for it only when the GPU is too small
from ft.recipe import Recipe



def this_gpu():
    """The GPU at hand as a plan GPU (its free memory, plus the CUDA context the plan counts), or None on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return GPU("this-gpu", f"{torch.cuda.get_device_name()}, {free / GiB:.1f} GiB free", free + CUDA_CONTEXT, None,
               bf16=torch.cuda.is_bf16_supported(), source="this device")


def resolve_batch_size(recipe: Recipe, *, log=print) -> Recipe:
    """The recipe with train.batch_size: auto replaced by the micro-batch chosen for this machine (auto.choose on a
    GPU, auto.cpu_batch_size on the CPU), said in one line; any other recipe as it is."""
    if recipe.train.batch_size != "auto":
        return recipe
    auto.require_plan(recipe)
    gpu = this_gpu()
    if gpu is None:
        size = auto.cpu_batch_size(recipe)
        log(f"train.batch_size auto: {size} (no GPU: a small fixed micro-batch)")
    else:
        plan = make(recipe, gpu)  # the plan of train.batch_size auto chooses the micro-batch (and says why in a note)
        size = plan.batch_size
        log(next(note for note in plan.notes if note.startswith("train.batch_size auto")))
    return auto.with_batch_size(recipe, size)


def check_before_training(recipe: Recipe, *, force: bool = False, skip: tuple[PhaseKind, ...] = (),
                          log=print) -> Plan | None:
    """On a GPU, plan the recipe against the device's free memory; stop (UserError, exit 2) with the plan's advice
    when the peak exceeds it by a clear margin, unless `force`. Skipped on the CPU."""
    import torch  # here only: `llama-ft plan` and the rest of ft.plan run without torch

    here = this_gpu()
    if here is None:
        return None
    free, name = here.memory - CUDA_CONTEXT, torch.cuda.get_device_name()
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
