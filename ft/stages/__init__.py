"""The training stages: what each one is (declared once, here), and `run_stage`, the pipeline that runs one.

Adding a stage means one entry in STAGES and one module `ft/stages/NAME.py` with
`run(recipe, *, resume, log, **options)`. Everything else reads this table: the CLI makes one command per stage
from it (`llama-ft NAME RECIPE [--set k=v]... [--output-dir DIR] [--resume] [--force]`), the recipe schema takes its
`stage` names and sections from it, `llama-ft plan` its data kinds, `llama-ft push` its metric keys.

From Python (a notebook, a script) a stage runs as the CLI runs it::

    import ft
    out = ft.run_stage("sft", "recipes/tiny.yaml", overrides=["train.max_steps=20"], output_dir="runs/x")

This module imports nothing heavy at module level (the CLI reads STAGES to build `llama-ft --help`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence


@dataclass(frozen=True)
class Stage:
    """What a training stage is, for everything that is not its training code."""

    name: str
    help: str  # the CLI command's help line
    data_kind: Literal["dialogs", "pairs", "prompts"]  # what one row of data.train is (the planner sizes it)
    multi_process: bool  # runs under torchrun / accelerate launch (the others keep several models on one GPU)
    resumable: bool  # --resume continues the run from its last checkpoint
    section: str | None = None  # its own recipe section (`reward:`, `ppo:`, ...), which only its recipes may have
    then_sft: str | None = None  # it samples data, then fine-tunes on it into output_dir/sft: what it writes first
    metric_keys: tuple[str, ...] = ()  # the keys of its metrics.json a model card shows, beyond the common ones
    next_merge: bool = False  # its "done" line says the next step: `llama-ft merge` of the policy adapter

    @property
    def pushed_folder(self) -> str:
        """The folder under output_dir that output.push publishes ("" = output_dir itself)."""
        return "sft" if self.then_sft else ""


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", "Supervised fine-tuning: train a LoRA adapter on chat data (loss on the answers only).",
          data_kind="dialogs", multi_process=True, resumable=True, next_merge=True,
          metric_keys=("loss_first", "loss_last", "eval_loss", "supervised_tokens", "supervised_tokens_per_second")),
    Stage("reward", "Train a reward model on preference pairs (ranking loss with Llama 2's margin).",
          data_kind="pairs", multi_process=True, resumable=True, section="reward",
          metric_keys=("loss_first", "loss_last", "eval_loss", "accuracy", "accuracy_split")),
    Stage("dpo", "Direct preference optimisation from an SFT run (the reference is the SFT model, no second copy).",
          data_kind="pairs", multi_process=True, resumable=True, section="dpo",
          metric_keys=("loss_first", "loss_last", "eval_loss", "eval")),
    Stage("rejection", "Rejection sampling: K answers per prompt, keep the best by reward, then SFT on them.",
          data_kind="prompts", multi_process=False, resumable=False, section="rejection",
          then_sft="the best answers (samples.jsonl)"),
    Stage("ppo", "RLHF with PPO as in Llama 2-Chat (or RLOO / GRPO through TRL): policy, reference, value and reward "
                 "models on one 4-bit base.",
          data_kind="prompts", multi_process=False, resumable=True, section="ppo", next_merge=True,
          metric_keys=("algorithm", "iterations", "reward_first", "reward_last", "kl_last", "kl_target", "kl_coef_final",
                       "eval")),
    Stage("gatt", "Ghost Attention: dialogs answered with the instruction in every turn, trained with it in the system "
                  "message only.",
          data_kind="dialogs", multi_process=False, resumable=False, section="gatt",
          then_sft="the Ghost Attention dialogs (gatt.jsonl)"),
)}



def metric_keys(stage: str | None) -> list[str]:
    """The metrics.json keys a model card shows for a run of `stage` (every stage's when it is not known)."""
    stages = [STAGES[stage]] if stage in STAGES else list(STAGES.values())
    keys = ["global_step", *(k for s in stages for k in s.metric_keys),
            "train_seconds", "peak_memory_bytes", "peak_memory_kind", "resumed_from"]
    return list(dict.fromkeys(keys))


def run_stage(stage: str, recipe: str | Path, *, overrides: Sequence[str] = (), output_dir: str | Path | None = None,
              resume: bool = False, force: bool = False, train: bool = True,
              say: Callable[[str], None] = print) -> Path:
    """Run one training stage of a recipe file, as `llama-ft STAGE RECIPE` does; returns the run folder.

    In order: the recipe is loaded (`overrides` are `--set` strings, `output_dir` replaces `output_dir`) and must be
    for this stage; a stage that keeps several models on one GPU refuses several processes; on a GPU, `llama-ft
    plan`'s memory check runs first (`force` trains anyway); with `output.push`, Hub access is checked before
    training, not after a week; the stage runs; the recipe's `eval:` benchmarks run (before/after, into
    metrics.json); `say` gets the "done:"/"next:" lines; the run is pushed.
    `train=False` (rejection, gatt) only samples. Raises ft.errors.UserError for anything the user must fix, and
    ft.errors.Interrupted on Ctrl-C or SIGTERM after a checkpoint was saved (its `.again` is the command that
    continues the run).
    """
    import importlib

    from ft import distributed
    from ft import plan as plan_mod
    from ft.errors import Interrupted, UserError

    info = STAGES[stage]
    loaded = load_recipe(recipe, overrides, output_dir, stage=stage)
    if resume and not info.resumable:
        raise UserError(f"llama-ft {stage} cannot resume a run: it samples again from the start. Its fine-tuning part "
                        f"is an SFT run of its own: continue it with `llama-ft sft {Path(loaded.output_dir) / 'sft'}"
                        "/recipe.yaml --resume`")
    if distributed.world_size() > 1 and not info.multi_process:
        several = ", ".join(s.name for s in STAGES.values() if s.multi_process)
        raise UserError(f"llama-ft {stage} runs in one process (its models share one GPU); start it without torchrun or "
                        f"accelerate launch. Several processes: {several}")
    distributed.setup()  # before any model is loaded
    if not distributed.is_sharded():  # every GPU holds the whole model: one GPU's plan applies
        plan_mod.check_before_training(loaded, force=force, skip=() if train else ("train",),
                                       log=lambda m: distributed.main_print(m, file=_stderr()))
    if loaded.output.push and distributed.is_main():  # find a missing token or a foreign repo now, not after a week
        if not train:
            raise UserError("output.push pushes the adapter trained on the best samples; drop --no-train or output.push")
        _check_push_access(loaded.output.repo_id)

    import datasets

    # every data row is read, checked and counted by llama-ft, which reports them; the datasets map/filter passes that
    # follow (packing, TRL's preparation) reshape rows already reported, and their bars would interleave with it
    datasets.disable_progress_bars()
    options = {"train": train} if info.then_sft else {}
    try:
        importlib.import_module(f"ft.stages.{stage}").run(loaded, resume=resume, log=distributed.main_print, **options)
    except Interrupted as e:
        if info.then_sft and e.checkpoint:  # its fine-tuning part is an SFT run of its own, in output_dir/sft
            e.again = f"llama-ft sft {Path(e.checkpoint).parent / 'recipe.yaml'} --resume"
        else:
            e.again = " ".join(["llama-ft", stage, str(recipe), *(f"--set {s}" for s in overrides),
                                *(["--output-dir", str(output_dir)] if output_dir else []), "--resume"])
        raise
    out = Path(loaded.output_dir)
    if not distributed.is_main():  # the main process says what happened, evaluates and pushes
        return out
    from ft import evaluation

    evaluation.after_training(loaded, out, log=say)  # the recipe's eval: section, if any
    if info.next_merge:
        say(f"\ndone: the adapter is in {out}\nnext: llama-ft merge {out} --output <dir>")
    elif info.then_sft:
        say(f"\ndone: {info.then_sft} in {out}" + (f", the adapter trained on them in {out}/sft" if train else ""))
    else:
        say(f"\ndone: the run is in {out}")
    if loaded.output.push:
        from ft import hub

        folder = out / info.pushed_folder
        try:
            hub.push(folder, loaded.output.repo_id, private=loaded.output.private)
        except UserError as e:
            raise UserError(f"the run finished, but the push failed: {e}\npush it later with: "
                            f"llama-ft push {folder} --repo-id {loaded.output.repo_id}") from None
    return out


def load_recipe(path: str | Path, overrides: Sequence[str] = (), output_dir: str | Path | None = None,
                stage: str | None = None):
    """The validated recipe with --set and --output-dir applied; refused if it is for another stage."""
    from ft import recipe as recipe_mod
    from ft.errors import UserError

    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    loaded = recipe_mod.load(Path(path), overrides)
    if stage is not None and loaded.stage != stage:
        raise UserError(f"{path}: this is a {loaded.stage} recipe; run it with `llama-ft {loaded.stage}`")
    return loaded


def _check_push_access(repo_id: str) -> None:
    from ft import hub
    from ft.errors import UserError

    try:
        hub.check_access(repo_id)
    except hub.Unreachable as e:
        print(f"warning: output.push: cannot reach the Hub to check access now ({e}); training anyway", file=_stderr())
    except UserError as e:  # no token, invalid token, someone else's namespace
        raise UserError(f"output.push: {e}") from None


def _stderr():
    import sys

    return sys.stderr
