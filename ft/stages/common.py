"""What every training stage shares: the recipe's `train:` section as Trainer arguments."""

from __future__ import annotations

from pathlib import Path

from ft import models
from ft.recipe import Recipe


def trainer_arguments(recipe: Recipe, out: Path, *, has_eval: bool) -> dict:
    """Keyword arguments common to TRL's SFTConfig, RewardConfig and DPOConfig (all TrainingArguments)."""
    import torch

    t = recipe.train
    dtype = models.compute_dtype(recipe.model.dtype)
    on_gpu = torch.cuda.is_available()
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
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
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
