"""`train.batch_size: auto`: the largest micro-batch whose planned peak fits the GPU with the plan's margin. The
candidates and the constants here; the choice, which plans each candidate, is planner.choose_batch_size (`llama-ft
plan` shows it for a named GPU); check.resolve_batch_size makes it at start-up for the GPU at hand (CPU_BATCH on
the CPU)."""

from __future__ import annotations

from ft.errors import UserError
from ft.recipe import Recipe

MARGIN = 0.10  # the planner's error band: auto plans within (1 - MARGIN) of the GPU; the check refuses past (1 + MARGIN)
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


def require_plan(recipe: Recipe) -> None:
    from ft.plan.phases import STAGES

    if recipe.stage not in STAGES:
        raise UserError(f"train.batch_size: auto needs a memory plan, and stage {recipe.stage} has none: give a number")
