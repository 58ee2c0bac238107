"""What every training stage shares: its skeleton (`start`: the run folder, the seed and the "run folder:" line;
`measured`: the measured section, after the models are loaded; then runs.save_final and metrics.json), the recipe's
`train:` section as Trainer arguments, and training that survives Ctrl-C (a checkpoint is saved, `--resume` continues
it)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback, set_seed

from ft import distributed, memory_use, models, runs
from ft.errors import Interrupted
from ft.recipe import Recipe


def start(recipe: Recipe, *, resume: bool, log) -> tuple[Path, str | None]:
    """Every stage's first step: the run folder created (or checked for --resume; runs.prepare), the seed set before
    any adapter or score head is initialised (so reruns and resumes repeat), and the "run folder:" line. Returns the
    folder and the checkpoint to resume from (or None)."""
    out, checkpoint = runs.prepare(recipe, resume=resume)
    set_seed(recipe.train.seed)
    log(f"run folder: {out}" + (f" (resuming from {checkpoint})" if checkpoint else ""))
    return out, checkpoint


@contextmanager
def measured():
    """The stage's measured section (its training), entered once its models are loaded: the peak memory counts from
    here (torch's CUDA peak, or the process's resident peak, reset on entry), so `peak_memory_bytes` means the same
    for every stage: the loaded models plus what training adds, never a loading transient. Yields a dict that holds,
    after the block, `train_seconds`, `peak_memory_bytes` and `peak_memory_kind` for the stage's metrics."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    memory_use.reset_peak()
    figures: dict = {}
    started = time.perf_counter()
    yield figures
    figures["train_seconds"] = round(time.perf_counter() - started, 3)
    figures.update(memory_use.training_peak())


def trainer_arguments(recipe: Recipe, out: Path, *, has_eval: bool) -> dict:
    """Keyword arguments common to TRL's SFTConfig, RewardConfig and DPOConfig (all TrainingArguments)."""
    import torch

    t = recipe.train
    dtype = models.compute_dtype(recipe.model.dtype)
    on_gpu = torch.cuda.is_available()
    sharded = distributed.is_sharded()
    return dict(
        output_dir=str(out),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio} if t.lr_scheduler == "cosine_with_min_lr" else None,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        activation_checkpointing=t.gradient_checkpointing,  # transformers >= 5.23's name for gradient checkpointing
        # reentrant under FSDP / ZeRO-3, as PEFT's FSDP-QLoRA and DeepSpeed guides run it; non-reentrant otherwise
        activation_checkpointing_kwargs={"use_reentrant": sharded},
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; a PeftModel would default to True
        fp16=on_gpu and dtype == torch.float16,
        bf16=on_gpu and dtype == torch.bfloat16,
        use_cpu=not on_gpu,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps or t.save_steps,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
    )


def batch_report(recipe: Recipe, log) -> dict:
    """The effective batch (per-device batch x accumulation x processes), printed and kept for the metrics."""
    t, processes = recipe.train, distributed.world_size()
    effective = t.batch_size * t.gradient_accumulation_steps * processes
    log(f"effective batch: {t.batch_size} per device x {t.gradient_accumulation_steps} accumulation x {processes} "
        f"process{'es' if processes > 1 else ''} = {effective} sequences per optimiser step")
    return {"world_size": processes, "effective_batch": effective}


def save_adapter(trainer, folder: Path, adapters: list[str] | None = None) -> None:
    """The trained adapter(s) and the tokenizer into `folder`. Called by every process: under FSDP / ZeRO-3 the
    sharded weights are gathered first (a collective step); the main process writes."""
    state = None
    if distributed.is_sharded():
        if distributed.engine() == "fsdp":
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")  # SHARDED would write nothing
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if distributed.is_main():
        trainer.model.save_pretrained(str(folder), selected_adapters=adapters, state_dict=state)
        trainer.processing_class.save_pretrained(str(folder))


def train(trainer, checkpoint: str | None):
    """trainer.train(), resuming from `checkpoint` if given.

    The first Ctrl-C (SIGINT) or SIGTERM (what a preempted VM or a job scheduler sends first) lets the
    current optimiser step finish, saves checkpoint-N and raises Interrupted (the CLI exits 128 + the
    signal number and says how to resume); a second one aborts at once.
    """
    models.align_special_tokens(trainer.model, trainer.processing_class)  # nothing left for the Trainer to announce
    if any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(Progress())
    with interruptible() as stopper:
        trainer.add_callback(stopper)
        try:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        finally:
            trainer.remove_callback(stopper)
    if stopper.signum is not None:
        saved = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        raise Interrupted(str(saved) if saved.is_dir() else None, stopper.signum)
    return result


@contextmanager
def interruptible():
    """Within the block, the first SIGINT/SIGTERM only sets `stopper.signum` (the loop stops at its next
    boundary and saves); a second one aborts at once. The previous handlers come back afterwards."""
    stopper = StopOnInterrupt()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stopper.handle) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    try:
        yield stopper
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Progress(ProgressCallback):
    """transformers' progress bar, with the latest loss on it, and one short line per logging step instead of the
    raw dict of every logged value (and none for the closing runtime summary: the stage prints its own)."""

    SHOWN = ("loss", "eval_loss", "learning_rate", "grad_norm")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs or "train_runtime" in logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        shown = {k: v for k, v in logs.items() if k in self.SHOWN or "accurac" in k or "margin" in k}
        if shown:
            self.training_bar.write(f"step {state.global_step}/{state.max_steps}: "
                                    + ", ".join(f"{k} {_number(v)}" for k, v in shown.items()))


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StopOnInterrupt(TrainerCallback):
    """Turns the first SIGINT/SIGTERM into "save a checkpoint and stop" at the end of the current step."""

    def __init__(self):
        self.signum = None

    def handle(self, signum, frame):
        if self.signum is not None:  # the second one: abort now, without saving
            print("\naborted: nothing was saved since the last checkpoint", file=sys.stderr, flush=True)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # typer turns it into exit code 130
            sys.exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.signum = distributed.any_rank(self.signum or 0) or None  # all ranks stop at the same step
        if self.signum is not None:
            control.should_log = True  # the loss since the last log is recorded, not lost
            control.should_save = True
            control.should_training_stop = True
        return control
