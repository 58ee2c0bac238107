"""The plan of a recipe on a GPU: its phases (ft/plan/phases.py), the peak phase's memory breakdown, whether it fits,
the time of the whole run and how many sessions that takes, and (when it does not fit) the advice."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ft.errors import UserError
from ft.plan import auto
from ft.plan.datasize import DataSize, data_size, tokenizer_file
from ft.plan.hardware import GPU
from ft.plan.memory import GiB, Step, finish
from ft.plan.phases import STAGES, Context, Phase, PhaseKind
from ft.plan.shapes import model_shape
from ft.recipe import Recipe
from ft.stages.registry import STAGES as declared


@dataclass
class Plan:
    stage: str
    model: str
    model_source: str
    gpu: GPU
    phases: list[Phase]
    data: DataSize
    schedule: dict
    session_hours: float
    notes: list[str]
    step: Step  # the recipe's training step as configured, before a stage's changes (the report's model lines)
    batch_size: int = 1  # train.batch_size planned (auto's choice when batch_size_auto)
    batch_size_auto: bool = False
    advice: list[dict] = field(default_factory=list)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: sum(finish(p.terms).values()))

    @property
    def train_phase(self) -> Phase | None:
        return next((p for p in self.phases if p.kind == "train"), None)

    @property
    def breakdown(self) -> dict[str, int]:
        return finish(self.peak_phase.terms)

    @property
    def peak_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu.memory

    @property
    def seconds(self) -> float | None:
        """Every phase's time (sampling, scoring, training), or None if any is unknown."""
        parts = [p.seconds for p in self.phases]
        return None if any(s is None for s in parts) or not parts else sum(parts)

    @property
    def hours(self) -> float | None:
        return None if self.seconds is None else self.seconds / 3600

    @property
    def sessions(self) -> int | None:
        return None if self.hours is None else max(1, math.ceil(self.hours / self.session_hours))

    def to_json(self) -> dict:
        phase = self.peak_phase
        train = self.train_phase or phase
        return {
            "stage": self.stage,
            "model": self.model,
            "model_config": self.model_source,
            "gpu": {"name": self.gpu.key, "label": self.gpu.label, "memory_bytes": self.gpu.memory,
                    "tflops": self.gpu.tflops, "utilisation": self.gpu.utilisation, "utilisation_source": self.gpu.source},
            "peak_bytes": self.peak_bytes,
            "gpu_bytes": self.gpu.memory,
            "fits": self.fits,
            "spare_bytes": self.gpu.memory - self.peak_bytes,
            "peak_phase": phase.name,
            "batch_size": self.batch_size,
            "batch_size_auto": self.batch_size_auto,
            "breakdown": self.breakdown,
            "phases": {p.name: {"peak_bytes": sum(finish(p.terms).values()), "breakdown": finish(p.terms),
                                "hours": None if p.seconds is None else p.seconds / 3600, "note": p.note}
                       for p in self.phases},
            "hours": self.hours,
            "time": {
                "data": {"rows": self.data.rows, "mean_tokens": self.data.tokens, "method": self.data.method,
                         "source": self.data.source},
                **self.schedule,
                "flops_per_token": train.flops_per_token,
                "session_hours": self.session_hours,
                "fits_session": None if self.hours is None else self.hours <= self.session_hours,
                "sessions": self.sessions,
                "resume_restarts": None if self.sessions is None else self.sessions - 1,
            },
            "advice": self.advice,
            "notes": self.notes,
        }


def make(recipe: Recipe, gpu: GPU, *, session_hours: float = 12.0, skip: tuple[PhaseKind, ...] = (),
         data: DataSize | None = None) -> Plan:
    """The plan of a validated recipe on a GPU, without advice (ft.plan.make adds it when the plan does not fit).
    `skip`: phase kinds to leave out (("train",): rejection --no-train). `data`: the training data's size, if already
    known (advice re-plans the same data many times)."""
    stage = STAGES.get(recipe.stage)
    if stage is None:
        raise UserError(f"stage {recipe.stage}: plan knows {', '.join(STAGES)}")
    shape, source = model_shape(recipe.model.name)
    if data is None:
        data = data_size(recipe.data.train, kind=declared[recipe.stage].data_kind, tokenizer_file=tokenizer_file(recipe))
    auto_note = None
    if recipe.train.batch_size == "auto":  # the micro-batch the stage will choose on this GPU at start-up
        size, auto_note = choose_batch_size(recipe, gpu, data, session_hours=session_hours, skip=skip)
        recipe = auto.with_batch_size(recipe, size)
    ctx = Context(recipe, shape, gpu, data)
    if auto_note:
        ctx.notes.insert(0, auto_note)
    phases = [p for p in stage.phases(ctx) if p.kind not in skip]
    if recipe.model.quantization == "4bit" and recipe.train.optim.startswith("paged"):
        ctx.notes.append("paged optimisers can spill their state to CPU memory under pressure; counted as on the GPU")
    if data.rows is None:
        ctx.notes.append("training data size unknown: no time estimate (use a local file, a Hub dataset plan knows, "
                         "or train.max_steps)" if not recipe.train.max_steps else
                         "training data size unknown: time from train.max_steps")
    plan = Plan(recipe.stage, recipe.model.name, source, gpu, phases, data, ctx.schedule, session_hours, ctx.notes,
                ctx.step(), batch_size=recipe.train.batch_size, batch_size_auto=auto_note is not None)
    return plan


def choose_batch_size(recipe: Recipe, gpu: GPU, data: DataSize, **make_options) -> tuple[int, str]:
    """(the micro-batch, a line saying why) for `recipe` (train.batch_size auto) on `gpu`: the largest of
    auto.candidates whose plan peaks at most (1 - auto.MARGIN) x the GPU's memory, or at most the peak of
    micro-batch 1 where another phase (sampling) needs more than that anyway; 1 if none does (the plan of 1 then says
    it does not fit)."""
    budget = gpu.memory * (1 - auto.MARGIN)
    chosen, peak, first = None, None, None
    for b in auto.candidates(recipe):
        plan = make(auto.with_batch_size(recipe, b), gpu, data=data, **make_options)
        first = first or plan
        if plan.peak_bytes > max(budget, first.peak_bytes if first.fits else 0):
            break  # a larger micro-batch only needs more
        chosen, peak = b, plan.peak_bytes
    share, memory = f"{1 - auto.MARGIN:.0%}", f"{gpu.label}'s {gpu.memory / GiB:.1f} GiB"
    if chosen is None:
        return 1, (f"train.batch_size auto: 1, though even 1 is planned at {first.peak_bytes / GiB:.1f} GiB "
                   f"({first.peak_phase.name}), above {share} of {memory}")
    return chosen, (f"train.batch_size auto: {chosen}, the largest micro-batch whose planned peak ({peak / GiB:.1f} "
                    f"GiB) fits {share} of {memory}" if peak <= budget else
                    f"train.batch_size auto: {chosen}, the largest micro-batch that keeps the planned peak at "
                    f"{peak / GiB:.1f} GiB, what {first.peak_phase.name} needs anyway (over {share} of {memory})")
