"""`train.batch_size: auto`: the largest micro-batch whose planned peak fits the GPU with the plan's margin. Pure
planning (no torch): `llama-ft plan` shows the choice for a named GPU; `check.resolve_batch_size` makes it at start-up
for the GPU at hand (or takes CPU_BATCH on the CPU)."""

from __future__ import annotations

from ft.errors import UserError
from ft.plan.hardware import GPU
from ft.recipe import Recipe

MARGIN = 0.10  # the plan's error band (ft/plan/check.py refuses past it): auto leaves this share of the GPU unplanned
LARGEST = 64  # no micro-batch above this: past it a step is compute-bound, and bigger only risks the estimate
CPU_BATCH = 4  # on the CPU, where no plan applies: small, so that a step stays interactive


def candidates(recipe: Recipe) -> list[int]:
    """The micro-batches auto may choose, smallest first: powers of two up to LARGEST; for ppo the divisors of
    ppo.mini_batch_size (a step's answers are split into equal micro-batches)."""
    if recipe.stage == "ppo":
        return [b for b in range(1, min(recipe.ppo.mini_batch_size, LARGEST) + 1) if recipe.ppo.mini_batch_size % b == 0]
    return [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= LARGEST]


def with_batch_size(recipe: Recipe, batch_size: int) -> Recipe:
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": batch_size})})


def cpu_batch_size(recipe: Recipe) -> int:
    """CPU_BATCH, or for ppo the largest divisor of ppo.mini_batch_size not above it."""
    return max(b for b in candidates(recipe) if b <= CPU_BATCH)


def choose(recipe: Recipe, gpu: GPU, **make_options) -> tuple[int, str]:
    """(the micro-batch, a line saying why) for `recipe` (train.batch_size auto) on `gpu`: the largest candidate whose
    plan peaks at most (1 - MARGIN) x the GPU's memory; 1 if none does (the plan then says it does not fit)."""
    from ft.plan.datasize import data_size, tokenizer_file
    from ft.plan.planner import make
    from ft.stages import STAGES

    budget = gpu.memory * (1 - MARGIN)
    data = data_size(recipe.data.train, kind=STAGES[recipe.stage].data_kind, tokenizer_file=tokenizer_file(recipe))
    chosen, peak, first = None, None, None
    for b in candidates(recipe):
        plan = make(with_batch_size(recipe, b), gpu, advice=False, data=data, **make_options)
        first = first or plan
        if plan.peak_bytes > budget:
            break  # a larger micro-batch only needs more
        chosen, peak = b, plan.peak_bytes
    gib = 1024 ** 3
    if chosen is None:
        return 1, (f"train.batch_size auto: 1, though even 1 is planned at {first.peak_bytes / gib:.1f} GiB "
                   f"({first.peak_phase.name}), above {1 - MARGIN:.0%} of {gpu.label}'s {gpu.memory / gib:.1f} GiB")
    return chosen, (f"train.batch_size auto: {chosen}, the largest micro-batch whose planned peak ({peak / gib:.1f} GiB) "
                    f"fits {1 - MARGIN:.0%} of {gpu.label}'s {gpu.memory / gib:.1f} GiB")


def require_plan(recipe: Recipe) -> None:
    from ft.plan.phases import STAGES

    if recipe.stage not in STAGES:
        raise UserError(f"train.batch_size: auto needs a memory plan, and stage {recipe.stage} has none: give a number")
