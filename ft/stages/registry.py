"""The stage registry: what each training stage is, declared once, as plain data.

Adding a stage means one entry in STAGES and one module `ft/stages/NAME.py` with
`run(recipe, *, resume, log, **options)` (tests/test_stages.py registers a toy stage and runs it through ft.run_stage
and the CLI; ft.cli.add_stage_command adds the command of a stage registered after the CLI was imported). Everything else reads this table: the CLI makes one command per stage
from it (`llama-ft NAME RECIPE [--set k=v]... [--output-dir DIR] [--resume] [--force]`), the recipe schema takes its
`stage` names and sections from it, `llama-ft plan` its data kinds, `llama-ft push` its metric keys, and
ft/runner.py (`ft.run_stage`) runs a stage by it.

This module imports nothing from ft (a test checks it): everything may read it, and it depends on nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
    chat_model: bool = True  # its adapter answers in chat (chat, merge, compare, eval: take it); False: it scores

    @property
    def pushed_folder(self) -> str:
        """The folder under output_dir that holds the trained adapter: what output.push publishes and the recipe's eval:
        section measures ("" = output_dir itself)."""
        return "sft" if self.then_sft else ""


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", "Supervised fine-tuning: train a LoRA adapter on chat data (loss on the answers only).",
          data_kind="dialogs", multi_process=True, resumable=True, next_merge=True,
          metric_keys=("loss_first", "loss_last", "eval_loss", "supervised_tokens", "supervised_tokens_per_second")),
    Stage("reward", "Train a reward model on preference pairs (ranking loss with Llama 2's margin).",
          data_kind="pairs", multi_process=True, resumable=True, section="reward", chat_model=False,
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
          metric_keys=("algorithm", "iterations", "reward_first", "reward_last", "kl_last", "eval")),
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
