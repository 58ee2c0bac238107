"""Advice for a recipe that does not fit: the smallest changes (`--set` overrides, or a bigger GPU) that make it fit,
each checked by planning the changed recipe again; and `make`, the plan with that advice (what `llama-ft plan`
shows). Advice re-plans with planner.make, which knows nothing of advice: no circle."""

from __future__ import annotations

from ft.errors import UserError
from ft.plan.hardware import GPU, GPUS
from ft.plan.memory import GiB
from ft.plan.phases import STAGES, PhaseKind
from ft.plan import auto, planner
from ft.plan.datasize import DataSize
from ft.plan.planner import Plan
from ft.recipe import Recipe, apply_override, validate


def make(recipe: Recipe, gpu: GPU, *, session_hours: float = 12.0, advice: bool = True,
         skip: tuple[PhaseKind, ...] = (), data: DataSize | None = None) -> Plan:
    """The plan of a validated recipe on a GPU (planner.make), with advice attached when it does not fit (`advice`:
    look for it). `skip`: phase kinds to leave out (("train",): rejection --no-train)."""
    plan = planner.make(recipe, gpu, session_hours=session_hours, skip=skip, data=data)
    if advice and not plan.fits:  # advice on the micro-batch planned (train.batch_size auto's choice)
        plan.advice = advise(auto.with_batch_size(recipe, plan.batch_size), gpu, plan, skip=skip)
    return plan


def with_overrides(recipe: Recipe, sets: list[str]) -> Recipe:
    """The recipe with `--set KEY=VALUE` overrides applied, validated again."""
    raw = recipe.model_dump(mode="json")
    for item in sets:
        apply_override(raw, item)
    return validate(raw, source="plan advice")


def advise(recipe: Recipe, gpu: GPU, plan: Plan, *, skip: tuple[PhaseKind, ...] = ()) -> list[dict]:
    """The smallest changes that make the recipe fit, each with its new peak (fitting ones only, least intrusive
    first); if no single change fits, the cumulative combination."""
    t = recipe.train

    def attempt(change: str, sets: list[str], on: GPU = gpu):
        try:
            p = planner.make(with_overrides(recipe, sets), on, skip=skip, data=plan.data)
        except UserError:
            return None
        return {"change": change, "set": sets, "peak_bytes": p.peak_bytes, "gpu": on.key, "fits": p.fits}

    savers = []  # (description, --set list), in order of how little they change the training
    effective = t.batch_size * t.gradient_accumulation_steps
    for b in range(t.batch_size - 1, 0, -1):
        if effective % b == 0:
            savers.append((f"batch {b} x accumulation {effective // b} (same {effective} sequences per step)",
                           [f"train.batch_size={b}", f"train.gradient_accumulation_steps={effective // b}"]))
    if not t.gradient_checkpointing:
        savers.append(("gradient checkpointing on", ["train.gradient_checkpointing=true"]))
    if t.optim not in ("adamw_8bit", "paged_adamw_8bit"):
        savers.append(("8-bit paged AdamW", ["train.optim=paged_adamw_8bit"]))
    sampling = STAGES[recipe.stage].sampling_batch  # halved, down to 1
    if sampling:
        section, key = sampling.split(".")
        value = getattr(getattr(recipe, section), key)
        if value > 1:
            for v in sorted({max(1, value // 2 ** k) for k in range(1, 6)}, reverse=True):
                savers.append((f"{sampling} {v}", [f"{sampling}={v}"]))
    length = recipe.data.max_length
    for new in (3072, 2048, 1536, 1024, 768, 512, 256):
        if new < length:
            savers.append((f"sequences of {new} tokens", [f"data.max_length={new}"]))
    r = recipe.lora.r
    for new in (r // 2, r // 4, r // 8):
        if 4 <= new < r:
            alpha = max(1, recipe.lora.alpha * new // r)
            savers.append((f"LoRA rank {new} (alpha {alpha}, same scale)", [f"lora.r={new}", f"lora.alpha={alpha}"]))

    found, taken_keys = [], set()
    for change, sets in savers:
        key = sets[0].split("=")[0]
        if key in taken_keys:  # one suggestion per key: the mildest one that fits
            continue
        result = attempt(change, sets)
        if result and result["fits"]:
            found.append(result)
            taken_keys.add(key)
    if not found:  # nothing alone fits: add the changes one after the other (a later value of a key replaces an
        # earlier one), keeping each that lowers the peak, until it fits; then undo what is not needed
        chosen: dict[str, tuple[str, list[str]]] = {}  # first key of a change -> (description, --set list)
        current = plan.peak_bytes
        for change, more in savers:
            trial_chosen = {**chosen, more[0].split("=")[0]: (change, more)}
            trial = attempt(change, _flat(trial_chosen))
            if trial is None or trial["peak_bytes"] >= current:
                continue
            chosen, current = trial_chosen, trial["peak_bytes"]
            if trial["fits"]:
                found.append(_relax(attempt, savers, chosen, trial))
                break
    bigger = sorted((g for g in GPUS.values() if g.memory > gpu.memory),
                    key=lambda g: (round(g.memory / GiB), g.tflops or 0))  # equal memory: the slower, cheaper one
    for g in bigger:
        result = attempt(f"a bigger GPU: {g.label}", [], on=g)
        if result and result["fits"]:
            found.append({**result, "set": [], "gpu_flag": f"--gpu {g.key}"})
            break
    return found


def _flat(chosen: dict) -> list[str]:
    return [x for _, sets in chosen.values() for x in sets]


def _relax(attempt, savers, chosen: dict, fitting: dict) -> dict:
    """Undo as much of a fitting combination as still fits: drop a change, or take a milder value of it."""
    for key in list(chosen):
        options = [None] + [(c, m) for c, m in savers if m[0].split("=")[0] == key]
        for option in options:  # mildest first: no change at all, then the savers' order
            if option is not None and option[1] == chosen[key][1]:
                break
            trial_chosen = {k: v for k, v in chosen.items() if k != key}
            if option is not None:
                trial_chosen[key] = option
            trial = attempt("", _flat(trial_chosen))
            if trial and trial["fits"]:
                chosen, fitting = trial_chosen, trial
                break
    return {**fitting, "change": " + ".join(c for c, _ in chosen.values()), "set": _flat(chosen)}
