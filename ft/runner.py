"""Running one training stage as `llama-ft STAGE RECIPE` does: `run_stage` (also `ft.run_stage`).

The recipe is loaded and checked for its stage, the process layout and the GPU's memory are checked, the stage's
module (ft/stages/NAME.py, found through the registry) trains, the recipe's `eval:` benchmarks run, and the run is
pushed. From Python (a notebook, a script)::

    import ft
    out = ft.run_stage("sft", "recipes/tiny.yaml", overrides=["train.max_steps=20"], output_dir="runs/x")

Everything a stage module shares with the others (Trainer arguments, interruptible training, saving) is
ft/stages/common.py; what each stage is, ft/stages/registry.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable, Sequence

from ft import distributed, evaluation, hub
from ft import plan as plan_mod
from ft import recipe as recipe_mod
from ft.errors import Interrupted, UserError
from ft.stages.registry import STAGES


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
    info = STAGES[stage]
    loaded = recipe_mod.load(recipe, overrides, output_dir=output_dir, stage=stage)
    if resume and not info.resumable:
        raise UserError(f"llama-ft {stage} cannot resume a run: it samples again from the start. Its fine-tuning part "
                        f"is an SFT run of its own: continue it with `llama-ft sft {Path(loaded.output_dir) / 'sft'}"
                        "/recipe.yaml --resume`")
    if distributed.world_size() > 1 and not info.multi_process:
        several = ", ".join(s.name for s in STAGES.values() if s.multi_process)
        raise UserError(f"llama-ft {stage} runs in one process (its models share one GPU); start it without torchrun or "
                        f"accelerate launch. Several processes: {several}")
    distributed.setup()  # before any model is loaded
    # train.batch_size auto: the micro-batch for this GPU (or the CPU's default), said once, then a number everywhere
    loaded = plan_mod.resolve_batch_size(loaded, log=lambda m: distributed.main_print(m, file=sys.stderr))
    if not distributed.is_sharded():  # every GPU holds the whole model: one GPU's plan applies
        plan_mod.check_before_training(loaded, force=force, skip=() if train else ("train",),
                                       log=lambda m: distributed.main_print(m, file=sys.stderr))
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
    evaluation.after_training(loaded, out, log=say)  # the recipe's eval: section, if any
    if info.next_merge:
        say(f"\ndone: the adapter is in {out}\nnext: llama-ft merge {out} --output <dir>")
    elif info.then_sft:
        say(f"\ndone: {info.then_sft} in {out}" + (f", the adapter trained on them in {out}/sft" if train else ""))
    else:
        say(f"\ndone: the run is in {out}")
    if loaded.output.push:
        folder = out / info.pushed_folder
        try:
            hub.push(folder, loaded.output.repo_id, private=loaded.output.private)
        except UserError as e:
            raise UserError(f"the run finished, but the push failed: {e}\npush it later with: "
                            f"llama-ft push {folder} --repo-id {loaded.output.repo_id}") from None
    return out


def _check_push_access(repo_id: str) -> None:
    try:
        hub.check_access(repo_id)
    except hub.Unreachable as e:
        print(f"warning: output.push: cannot reach the Hub to check access now ({e}); training anyway", file=sys.stderr)
    except UserError as e:  # no token, invalid token, someone else's namespace
        raise UserError(f"output.push: {e}") from None

