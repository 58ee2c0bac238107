"""What each stage keeps on the GPU and for how long: a stage is a function `Context -> list[Phase]` in STAGES, a
phase the memory of one part of the stage (sampling, scoring, training) and its time. Pure arithmetic given a
Context, apart from reading a saved adapter's shape (ft/runs.py) and sizing data.eval."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Literal, NamedTuple

from ft.plan.datasize import DataSize, data_size, tokenizer_file
from ft.plan.hardware import GPU
from ft.plan.memory import Shape, Step, kv_cache_bytes, step_terms, weight_bytes
from ft.plan.speed import fixed_seconds, flops_per_token
from ft import runs
from ft.recipe import Recipe

PhaseKind = Literal["sample", "score", "train"]


@dataclass
class Phase:
    """One part of a stage: what it keeps on the GPU, and how long it takes over the whole run."""

    kind: PhaseKind  # what the phase does: generate answers, score them (no gradients), or train
    name: str
    terms: dict[str, int]  # allocated bytes by term (allocator slack and CUDA context added by finish())
    seconds: float | None = None
    flops_per_token: float | None = None
    note: str = ""
    step: Step | None = None  # the training step, for the report


def _adapter_lora(folder: str | Path) -> tuple[tuple, int] | None:
    """(target modules, rank) of the LoRA adapter saved in a run folder, or None if it is not there yet."""
    if not (Path(folder).expanduser() / runs.ADAPTER_CONFIG).is_file():
        return None
    saved = runs.lora_shape(folder)
    return tuple(saved.target_modules), saved.r


@dataclass
class Context:
    """What every stage function gets: the recipe, the model shape, the GPU and the data size."""

    recipe: Recipe
    shape: Shape
    gpu: GPU
    data: DataSize
    notes: list[str] = field(default_factory=list)
    schedule: dict = field(default_factory=dict)

    @property
    def compute_bytes(self) -> int:
        return 4 if self.recipe.model.dtype == "float32" else 2

    @property
    def upcast_frozen(self) -> bool:
        """Whether training upcasts a quantised base's embeddings, head and norms to float32 (model.upcast_frozen);
        by default they stay in the compute dtype (ft/models.py attach_lora)."""
        return self.recipe.model.quantization in ("4bit", "8bit") and self.recipe.model.upcast_frozen

    @cached_property
    def lora(self) -> tuple[tuple, int]:
        """(targets, rank) of the adapter being trained: the starting run's adapter if it is on disk, else lora:."""
        lora = runs.trained_lora(self.recipe, missing_ok=True)
        return tuple(lora.target_modules), lora.r

    def step(self, **changes) -> Step:
        """The recipe's training step (model, LoRA, train: settings), with `changes` to its fields."""
        targets, r = self.lora
        t, q = self.recipe.train, self.recipe.model.quantization
        base = Step(shape=self.shape, sequences=t.batch_size, length=self.recipe.data.max_length, quantization=q,
                    compute_bytes=self.compute_bytes, upcast_frozen=self.upcast_frozen, targets=targets, r=r,
                    dropout=runs.trained_lora(self.recipe, missing_ok=True).dropout, optim=t.optim, checkpointing=t.gradient_checkpointing)
        return replace(base, **changes)

    def train_seconds(self, step: Step, tokens: float, micro_batch_tokens: float | None = None) -> float | None:
        """Compute time at the GPU's utilisation, plus a fixed cost per micro-batch (see fixed_seconds)."""
        if not self.gpu.tflops or not self.gpu.utilisation:
            return None
        micro_batches = tokens / max(micro_batch_tokens or step.tokens, 1)
        return (tokens * flops_per_token(step) / (self.gpu.tflops * 1e12 * self.gpu.utilisation)
                + micro_batches * fixed_seconds(step, self.gpu))

    def forward_seconds(self, step: Step, tokens: float) -> float | None:
        return self.train_seconds(replace(step, train=False), tokens)

    def generate_seconds(self, calls: int, new_tokens: int, sequences: int, prompt: float) -> float | None:
        """Sampling time: decoding is bound by Python overhead per layer and by reading the weights and the KV cache
        each step; the prompt's prefill is compute-bound. ~1 ms per layer and step is an assumption in the range of
        published Hugging Face generate() figures (LitGPT's resource tables, Oct 2023: Llama 2 7B nf4-dq decodes
        17.3 tokens/s on an A100, ~1.8 ms per layer, with the bitsandbytes of the time)."""
        if not self.gpu.tflops or not self.gpu.bandwidth:
            return None
        w = weight_bytes(self.step(train=False))
        kv = kv_cache_bytes(self.shape, sequences, int(prompt + new_tokens / 2), self.compute_bytes)
        per_token = self.shape.layers * 1e-3 + (w["quantised"] + w["unquantised"] + kv) / (self.gpu.bandwidth * 1e9 * 0.6)
        prefill = self.forward_seconds(self.step(sequences=sequences, length=int(prompt), masked=False),
                                       sequences * prompt) or 0
        return calls * (new_tokens * per_token + prefill)


def _packed(ctx: Context, rows: int | None, tokens: float | None, length: int) -> tuple[float | None, float | None]:
    """(sequences, mean tokens per sequence) of the training data, packed into `length` or one example per row."""
    if rows is None or not tokens:
        return None, None
    if ctx.recipe.data.packing:
        total = rows * min(tokens, length)
        return math.ceil(total / (0.98 * length)), length  # best-fit-decreasing packs are ~98% full
    return rows, min(tokens, length) * 1.06  # group_by_length: ~6% padding (README, "SFT throughput")


def schedule(ctx: Context, sequences: float | None, per_sequence: float | None, *, seq_per_example: int = 1) -> dict:
    """Tokens per optimiser step, steps per epoch, total steps and total tokens of a training run."""
    t = ctx.recipe.train
    per_step_seqs = t.batch_size * t.gradient_accumulation_steps
    out = {"sequences_per_step": per_step_seqs * seq_per_example, "tokens_per_step": None, "steps_per_epoch": None,
           "total_steps": t.max_steps, "total_tokens": None}
    if per_sequence:
        out["tokens_per_step"] = per_step_seqs * seq_per_example * per_sequence
    if sequences:
        out["steps_per_epoch"] = max(1, math.ceil(sequences / per_step_seqs))
        if t.max_steps is None:
            out["total_steps"] = max(1, math.ceil(t.epochs * out["steps_per_epoch"]))
    if out["total_steps"] and out["tokens_per_step"]:
        out["total_tokens"] = out["total_steps"] * out["tokens_per_step"]
    return out


def _train_phase(ctx: Context, name: str, step: Step, sched: dict, note: str = "", *, eval_kind: str | None = None,
                 eval_passes: int = 1) -> Phase:
    """The training phase: memory of one step, time of the whole run (plus evaluation over data.eval, if any)."""
    t = ctx.recipe.train
    seconds = None
    if sched.get("total_tokens"):
        micro = sched["tokens_per_step"] / t.gradient_accumulation_steps
        seconds = ctx.train_seconds(step, sched["total_tokens"], micro)
        if seconds is not None and ctx.recipe.data.eval and eval_kind:
            ev = data_size(ctx.recipe.data.eval, kind=eval_kind, tokenizer_file=tokenizer_file(ctx.recipe))
            if ev.rows and ev.tokens:
                every = t.eval_steps or t.save_steps
                evals = (sched["total_steps"] // every + 1) if eval_kind == "dialogs" or ctx.recipe.stage == "dpo" else 1
                eval_tokens = ev.rows * min(ev.tokens, ctx.recipe.data.max_length) * eval_passes
                seconds += evals * (ctx.forward_seconds(step, eval_tokens) or 0)
                ctx.notes.append(f"time includes {evals} evaluation pass{'es' if evals > 1 else ''} over data.eval "
                                 f"({ev.rows:,} rows)")
    return Phase("train", name, step_terms(step), seconds, flops_per_token(step), note, step)


def phases_sft(ctx: Context) -> list[Phase]:
    r = ctx.recipe
    seqs, per_seq = _packed(ctx, ctx.data.rows, ctx.data.tokens, r.data.max_length)
    length = r.data.max_length if r.data.packing else int(min(r.data.max_length, (per_seq or r.data.max_length) * 1.5))
    step = ctx.step(length=length, masked=r.data.packing or r.train.batch_size > 1)
    ctx.schedule = schedule(ctx, seqs, per_seq)
    phase = _train_phase(ctx, "train", step, ctx.schedule, eval_kind="dialogs")
    if not r.data.packing:
        ctx.notes.append(f"unpacked: memory sized at the longest batch ({length} tokens, 1.5x the mean, "
                         f"at most data.max_length)")
    return [phase]


def phases_reward(ctx: Context) -> list[Phase]:
    r = ctx.recipe
    mean = min(ctx.data.tokens or r.data.max_length, r.data.max_length)
    step = ctx.step(sequences=2 * r.train.batch_size, masked=True, head="score", trainable_extra=ctx.shape.hidden,
                    length=r.data.max_length)
    ctx.schedule = schedule(ctx, ctx.data.rows, mean * 1.06, seq_per_example=2)
    ctx.notes.append("reward: chosen and rejected go through in one batch (2 x train.batch_size sequences), "
                     "memory sized at data.max_length")
    return [_train_phase(ctx, "train", step, ctx.schedule, eval_kind="pairs", eval_passes=2)]


def phases_dpo(ctx: Context) -> list[Phase]:
    r = ctx.recipe
    mean = min(ctx.data.tokens or r.data.max_length, r.data.max_length)
    frozen = 1 if r.model.adapter else 0  # TRL loads a frozen copy of the starting adapter as the reference
    step = ctx.step(sequences=2 * r.train.batch_size, masked=True, adapters=1 + frozen, length=r.data.max_length)
    ctx.schedule = schedule(ctx, ctx.data.rows, mean * 1.06, seq_per_example=2)
    phase = _train_phase(ctx, "train", step, ctx.schedule, eval_kind="pairs", eval_passes=4)
    if phase.seconds is not None:  # plus the reference model's forward pass over the same tokens
        phase.seconds += ctx.forward_seconds(step, ctx.schedule["total_tokens"])
    ctx.notes.append("dpo: chosen and rejected in one batch; the reference pass (no gradients) is timed, "
                     "its memory is below the training step's")
    return [phase]


def _reward_runs(ctx: Context, folders: list[str]) -> list[tuple[Shape, tuple, int]]:
    """(shape, targets, r) of each reward model run folder; the policy's shape and lora: where a folder is not there yet."""
    out = []
    for folder in folders:
        if not (Path(folder).expanduser() / runs.ADAPTER_CONFIG).is_file():
            ctx.notes.append(f"{folder}: not there yet; sized as the policy's base and LoRA")
        targets, rank = _adapter_lora(folder) or ctx.lora
        out.append((ctx.shape, targets, rank))
    return out


def _sampling_phase(ctx: Context, name: str, sequences: int, prompt: int, new_tokens: int, *, adapters: int = 1,
                    base_upcast: bool = False) -> Phase:
    step = ctx.step(sequences=sequences, length=prompt, train=False, head="last", masked=True,
                    upcast_frozen=base_upcast, adapters=adapters, trainable_adapters=0)
    terms = step_terms(step)
    terms["kv_cache"] = kv_cache_bytes(ctx.shape, sequences, prompt + new_tokens, ctx.compute_bytes)
    return Phase("sample", name, terms, note=f"{sequences} sequences x ({prompt} prompt + {new_tokens} new) tokens")


def phases_rejection(ctx: Context) -> list[Phase]:
    r, cfg = ctx.recipe, ctx.recipe.rejection
    prompt_max = r.data.max_length  # prompts are not truncated: the recipe's max_length is the assumed bound
    sequences = cfg.batch_size * cfg.k
    phases = [_sampling_phase(ctx, "sample", sequences, prompt_max, cfg.max_new_tokens)]
    prompts = ctx.data.rows
    mean_prompt = ctx.data.prompt_tokens or ctx.data.tokens or prompt_max / 4
    if prompts and ctx.gpu.tflops:
        phases[0].seconds = ctx.generate_seconds(math.ceil(prompts / cfg.batch_size), cfg.max_new_tokens, sequences,
                                                 mean_prompt)
    scorers = [cfg.reward_model] + ([cfg.safety_model] if cfg.safety_model else [])
    for i, (shape, targets, rank) in enumerate(_reward_runs(ctx, scorers)):
        step = Step(shape=shape, sequences=8, length=prompt_max + cfg.max_new_tokens, quantization=r.model.quantization,
                    compute_bytes=ctx.compute_bytes, upcast_frozen=False, targets=targets, r=rank, train=False,
                    head="score", trainable_adapters=0)
        seconds = ctx.forward_seconds(step, prompts * cfg.k * (mean_prompt + cfg.max_new_tokens)) if prompts else None
        phases.append(Phase("score", f"score ({'safety' if i else 'reward'} model)", step_terms(step), seconds,
                            note="batches of 8 answers, no gradients"))
    answer = mean_prompt + cfg.max_new_tokens * 0.75
    seqs, per_seq = _packed(ctx, prompts, answer, r.data.max_length)
    step = ctx.step(length=r.data.max_length if r.data.packing else int(min(answer * 1.5, r.data.max_length)),
                    masked=True)
    ctx.schedule = schedule(ctx, seqs, per_seq)
    phases.append(_train_phase(ctx, "train (SFT on the best answers)", step, ctx.schedule))
    ctx.notes.append(f"rejection: prompts assumed at most data.max_length={prompt_max} tokens (the stage does not "
                     f"truncate them); answers timed at the full rejection.max_new_tokens={cfg.max_new_tokens}")
    return phases


def phases_ppo(ctx: Context) -> list[Phase]:
    """PPO/RLOO/GRPO on ONE 4-bit base: the policy adapter (trained), a frozen reference copy, a value adapter with a
    scalar head (trained; PPO only), one adapter + head per reward model."""
    r, p = ctx.recipe, ctx.recipe.ppo
    rewards = p.reward_models + ([p.safety_model] if p.safety_model else [])
    samples, new, gen_batch = p.samples_per_prompt, p.max_new_tokens, p.generation_batch_size
    prompts_per_iter, mini = p.batch_size, p.mini_batch_size
    value = p.algorithm == "ppo"
    adapters = 2 + (1 if value else 0) + len(rewards)  # policy, reference, value, reward models
    trainable = 2 if value else 1
    length = r.data.max_length + new
    phases = [_sampling_phase(ctx, "sample", gen_batch * samples, r.data.max_length, new, adapters=adapters,
                              base_upcast=ctx.upcast_frozen)]  # one base, prepared for training, samples too
    step = ctx.step(length=length, masked=True, adapters=adapters, trainable_adapters=trainable,
                    trainable_extra=ctx.shape.hidden if value else 0)
    terms = step_terms(step)
    if value:  # ft/stages/ppo.py back-propagates the policy loss before the value forward: one graph alive at a time
        extra = step_terms(replace(step, head="score"))
        terms["activations"] = max(terms["activations"], extra["activations"])
    if p.algorithm == "ppo":  # the answer tokens' logits, upcast, log-softmax and its gradient (no fused head there)
        terms["loss"] = max(terms.get("loss", 0), r.train.batch_size * new * ctx.shape.vocab * 14)
    phases.append(Phase("train", "train (policy" + (" + value" if value else "") + ")", terms,
                        flops_per_token=flops_per_token(step), step=step))
    prompts = ctx.data.rows
    iterations = r.train.max_steps or (math.ceil(r.train.epochs * prompts / prompts_per_iter) if prompts else None)
    if iterations and ctx.gpu.tflops:
        mean_prompt = ctx.data.prompt_tokens or ctx.data.tokens or r.data.max_length / 4
        tokens = iterations * prompts_per_iter * samples * (mean_prompt + new)
        gen = ctx.generate_seconds(iterations * math.ceil(prompts_per_iter / gen_batch), new, gen_batch * samples,
                                   mean_prompt)
        forwards = (1 + len(rewards) + (1 if value else 0)) * (ctx.forward_seconds(step, tokens) or 0)
        phases[0].seconds = gen
        phases[1].seconds = (ctx.train_seconds(step, tokens) or 0) * (2 if value else 1) + forwards
    ctx.schedule = {"sequences_per_step": mini, "tokens_per_step": mini * ((ctx.data.prompt_tokens or 0) + new),
                    "steps_per_epoch": None, "total_steps": iterations, "total_tokens": None}
    ctx.notes.append(f"{p.algorithm}: {adapters} adapters on one 4-bit base; sampling {gen_batch} x {samples} "
                     f"sequences per generate call; micro-batches of {r.train.batch_size} x {length} tokens"
                     + ("; the answer tokens' logits in float32 (14 bytes x vocab per answer token)"
                        if p.algorithm == "ppo" else "; log-probs through TRL's fused head"))
    return phases


def phases_gatt(ctx: Context) -> list[Phase]:
    """Ghost Attention: sample the answers of multi-turn dialogs (KV cache of gatt.batch_size dialogs), then the SFT
    stage trains on them at data.max_length."""
    r, g = ctx.recipe, ctx.recipe.gatt
    phases = [_sampling_phase(ctx, "sample", g.batch_size, r.data.max_length, g.max_new_tokens)]
    dialogs = ctx.data.rows
    if dialogs and ctx.gpu.tflops:
        phases[0].seconds = ctx.generate_seconds(math.ceil(dialogs / g.batch_size) * g.max_turns, g.max_new_tokens,
                                                 g.batch_size, ctx.data.tokens or r.data.max_length / 2)
    phases += phases_sft(ctx)
    ctx.notes.append(f"gatt: {g.max_turns} turns sampled per dialog, {g.batch_size} dialogs per generate call")
    return phases


class StagePlan(NamedTuple):
    phases: Callable[[Context], list[Phase]]
    sampling_batch: str | None = None  # the recipe key of its generate() batch, which advice may lower


# What the planner adds to each stage declared in ft/stages/registry.py (which owns what a stage is, its data kind
# among it): how its memory and time are counted.
STAGES: dict[str, StagePlan] = {
    "sft": StagePlan(phases_sft),
    "reward": StagePlan(phases_reward),
    "dpo": StagePlan(phases_dpo),
    "rejection": StagePlan(phases_rejection, "rejection.batch_size"),
    "ppo": StagePlan(phases_ppo, "ppo.generation_batch_size"),
    "gatt": StagePlan(phases_gatt, "gatt.batch_size"),
}
