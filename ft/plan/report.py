"""The text report of `llama-ft plan`: the model and training settings, the memory at the peak by term, the advice,
and the time."""

from __future__ import annotations

from dataclasses import replace

from ft.plan.memory import ALLOCATOR_SLACK, GiB, Step, finish, weight_bytes
from ft.plan.planner import Plan
from ft.plan.speed import flops_per_token
from ft.recipe import Recipe, TrainSection

TERM_LABELS = {
    "weights": "weights",
    "lora": "LoRA adapter(s) (float32)",
    "gradients": "LoRA gradients (float32)",
    "optimizer": "optimizer state",
    "activations": "activations kept for backward",
    "backward": "recomputed layer + backward buffers",
    "loss": "LM head and loss",
    "kv_cache": "KV cache",
    "dequantization": "dequantisation buffers",
    "allocator": f"allocator slack ({ALLOCATOR_SLACK:.0%} of short-lived)",
    "cuda_context": "CUDA context",
}


def _g(n: float) -> str:
    return f"{n / GiB:.2f}"


def _n(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _flops(f: float) -> str:
    return f"{f / 1e9:.1f} GFLOP" if f >= 1e8 else f"{f / 1e6:.2f} MFLOP"


def _step_line(schedule: dict, train: TrainSection) -> str:
    """The report's "step" line: sequences and tokens per optimiser step, steps per epoch and in all."""
    line = (f"  step      {schedule['sequences_per_step']} sequences, ~{schedule['tokens_per_step']:,.0f} tokens per "
            "optimiser step")
    if schedule.get("steps_per_epoch"):
        line += f"; {_n(schedule['steps_per_epoch'], 'step')} per epoch"
    if schedule.get("total_steps"):
        line += f"; {_n(schedule['total_steps'], 'step')} in all"
        if train.max_steps:
            line += " (train.max_steps)"
        else:
            line += f" ({train.epochs:g} epoch{'' if train.epochs == 1 else 's'})"
    return line


def _frozen_line(s: Step, dtype: str) -> str:
    """Why the embeddings, head and norms of a quantised base weigh what they do: which model.upcast_frozen applies."""
    if s.compute_bytes == 4:
        return "    (embeddings/head/norms in float32: the compute dtype)"
    other = weight_bytes(replace(s, upcast_frozen=not s.upcast_frozen))["unquantised"]
    if s.upcast_frozen:
        return (f"    (embeddings/head/norms upcast to float32: model.upcast_frozen: true; false keeps them {dtype}, "
                f"{_g(other)})")
    return (f"    (embeddings/head/norms frozen in {dtype} as loaded; model.upcast_frozen: true upcasts them to "
            f"float32, {_g(other)})")


def render(plan: Plan, recipe: Recipe, label: str) -> str:
    """The report of `plan` (made from `recipe`), headed `label` (the recipe's path)."""
    p, g, s = plan.peak_phase, plan.gpu, plan.step
    lines = [f"llama-ft plan {label} on {g.key} ({g.label}: {g.memory / GiB:.1f} GiB"
             + (f", {g.tflops:g} TFLOPS fp16/bf16 dense" if g.tflops else "") + ")"]
    m = s.shape
    size = f"{m.params() / 1e9:.2f} B" if m.params() >= 1e8 else f"{m.params() / 1e6:.2f} M"
    lines.append(f"model    {plan.model} ({plan.model_source}): {size} parameters, {m.layers} layers, "
                 f"hidden {m.hidden}, {recipe.model.quantization}")
    targets, r = s.targets, s.r
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if g.bf16 and g.tflops else "float16")
    batch = f"{plan.batch_size} (auto)" if plan.batch_size_auto else plan.batch_size
    lines.append(f"training {plan.stage}: {dtype} compute, batch {batch} x {recipe.data.max_length} "
                 f"tokens{' (packed)' if recipe.data.packing and plan.stage in ('sft', 'gatt', 'rejection') else ''}, "
                 f"gradient checkpointing {'on' if recipe.train.gradient_checkpointing else 'off'}, LoRA r={r} on "
                 f"{len(targets)} projections ({m.lora_params(targets, r) / 1e6:.1f} M parameters), {recipe.train.optim}")
    lines.append("")
    lines.append(f"memory at the peak ({p.name}{': ' + p.note if p.note else ''})" + " " * 4 + "GiB")
    w = weight_bytes(s)
    detail = {"weights": f"4-bit NF4+DQ projections {_g(w['quantised'])}, embeddings/head/norms {_g(w['unquantised'])}"
              if recipe.model.quantization == "4bit" else "",
              "optimizer": recipe.train.optim}
    for key, value in plan.breakdown.items():
        if not value:
            continue
        name = TERM_LABELS.get(key, key) + (f" ({detail[key]})" if detail.get(key) else "")
        lines.append(f"  {name:<64} {_g(value):>6}")
        if key == "weights" and s.quantised:
            lines.append(_frozen_line(s, dtype))
    spare = g.memory - plan.peak_bytes
    verdict = f"fits, {spare / GiB:.1f} GiB to spare" if plan.fits else f"does NOT fit: {-spare / GiB:.1f} GiB short"
    lines.append(f"  {'peak':<64} {_g(plan.peak_bytes):>6}  of {g.memory / GiB:.1f} GiB: {verdict}")
    if len(plan.phases) > 1:
        lines.append("  phases: " + "; ".join(f"{ph.name} {sum(finish(ph.terms).values()) / GiB:.1f} GiB"
                                               for ph in plan.phases))
    if plan.advice:
        lines.append("")
        lines.append("to make it fit (each line on its own, with its new peak):")
        for a in plan.advice:
            flags = a.get("gpu_flag") or " ".join(f"--set {x}" for x in a["set"])
            lines.append(f"  {a['change']:<58} {a['peak_bytes'] / GiB:5.1f} GiB   {flags}")
    elif not plan.fits:
        lines.append("no change plan knows makes it fit on this GPU")
    lines.append("")
    lines.append("time")
    lines.append(f"  data      {plan.data.describe()}")
    if plan.schedule.get("tokens_per_step"):
        lines.append(_step_line(plan.schedule, recipe.train))
    train = plan.train_phase
    if train is not None and train.flops_per_token and train.step is not None:
        step = train.step
        other = flops_per_token(step, recompute=not step.checkpointing)
        lines.append(f"  compute   {_flops(train.flops_per_token)} per token (LoRA training "
                     f"{'with' if step.checkpointing else 'without'} recomputation; {_flops(other)} "
                     f"{'without' if step.checkpointing else 'with'})"
                     + (f" at {g.utilisation:.0%} of {g.tflops:g} TFLOPS ({g.source})" if g.utilisation else ""))
    if plan.hours is None:
        lines.append("  hours     unknown" + ("" if g.tflops else " (give --gpu a name for a time estimate)"))
    else:
        parts = "; ".join(f"{ph.name} {ph.seconds / 3600:.1f} h" for ph in plan.phases if ph.seconds) \
            if len(plan.phases) > 1 else ""
        fits = plan.hours <= plan.session_hours
        lines.append(f"  hours     {plan.hours:.1f} h" + (f" ({parts})" if parts else "") + ": "
                     + (f"fits one {plan.session_hours:g} h session" if fits else
                        f"more than one {plan.session_hours:g} h session: {plan.sessions} sessions, "
                        f"{plan.sessions - 1} --resume restart{'s' if plan.sessions > 2 else ''}"))
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
