"""Supervised fine-tuning: data -> tokenizer -> 4-bit model + LoRA -> TRL SFTTrainer -> run folder.

The loss is on the assistant answers only (and their EOS), as in Llama 2-Chat's SFT; packed
examples never attend to each other (TRL's best-fit-decreasing packing, position ids that restart
at each example, and transformers' block-diagonal mask for SDPA; see data.PackedCollator).
"""

from __future__ import annotations

import torch
from trl import SFTConfig, SFTTrainer

from ft import data, distributed, models, runs
from ft.stages import common
from ft.recipe import Recipe


def run(recipe: Recipe, *, resume: bool = False, log=print) -> dict:
    out, checkpoint = common.start(recipe, resume=resume, log=log)

    # 1. tokenizer and data: every row is checked before the model is loaded
    tokenizer = models.load_tokenizer(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    cfg = recipe.data
    train_set, train_report, train_dialogs, eval_set, eval_report = load_data(recipe, tokenizer, log)
    batch = common.batch_report(recipe, log)

    # 2. model: quantised base + LoRA (or the adapter of an earlier run)
    base = models.load_model(recipe.model)
    model = models.attach_lora(
        base, recipe.lora, adapter=recipe.model.adapter, gradient_checkpointing=recipe.train.gradient_checkpointing,
        upcast_frozen=recipe.model.upcast_frozen,
    )

    # 3. trainer: the recipe mapped onto TRL's SFTConfig
    t = recipe.train
    config = SFTConfig(
        **common.trainer_arguments(recipe, out, has_eval=eval_set is not None),
        max_length=cfg.max_length,
        packing=False,  # packed above (data.load_sft), batched row by row by data.PackedCollator
        train_sampling_strategy="random" if cfg.packing else "group_by_length",
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=data.PackedCollator(tokenizer.pad_token_id) if cfg.packing else None,
    )
    models.keep_lora_float32(trainer.model)  # TRL casts QLoRA adapters to bfloat16, which a T4 lacks

    # 4. train
    with common.measured() as measured:
        result = common.train(trainer, checkpoint)
    seconds = measured["train_seconds"]

    # 5. save the adapter and tokenizer, then the metrics (the "finished" marker)
    runs.save_final(out, lambda tmp: common.save_adapter(trainer, tmp))
    counts = {f"{k}_tokens" if k != "tokens" else k: int(distributed.total(v)) for k, v in trainer.counts.items()}
    logged = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    losses = [loss for _, loss in logged]
    metrics = {
        "stage": "sft",
        "train_loss": result.training_loss,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        "loss_history": logged,  # [step, loss] as logged, the steps before a --resume included
        "resumed_from": checkpoint,
        **measured,
        **counts,
        "padding_fraction": counts["padding_tokens"] / max(counts["tokens"], 1),
        "supervised_tokens_per_second": counts["supervised_tokens"] / seconds if seconds else None,
        **batch,
        "data": {"train": vars(train_report), "eval": vars(eval_report) if eval_report else None},
    }
    if eval_set is not None:
        metrics["eval_loss"] = trainer.evaluate().get("eval_loss")
    if t.generate_samples and not distributed.is_sharded():  # sharded weights: no one process can generate
        step = max(len(train_dialogs) // t.generate_samples, 1)  # spread over the data, not just its head
        picked = train_dialogs[::step][: t.generate_samples]
        metrics["samples"] = distributed.on_main(lambda: generate_samples(trainer.model, tokenizer, picked, log))
    runs.write_json(out / runs.METRICS_FILE, metrics)
    log(f"loss {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f} over {metrics['global_step']} steps "
        f"({metrics['supervised_tokens_per_second'] or 0:.0f} supervised tokens/s)")
    return metrics


def load_data(recipe: Recipe, tokenizer, log):
    """(train set, its report, its checked dialogs, eval set or None, its report or None): read, checked and
    tokenized once, by the main process, for every process."""
    cfg = recipe.data
    load = lambda sources: data.load_sft(sources, tokenizer, max_length=cfg.max_length, skip_invalid=cfg.skip_invalid,
                                         packing=cfg.packing)
    train_set, train_report, train_dialogs = distributed.on_main(lambda: load(cfg.train))
    log(train_report.summary("train data"))
    for note in train_report.notes:
        log(f"  {note}")
    eval_set, eval_report = None, None
    if cfg.eval:
        eval_set, eval_report, _ = distributed.on_main(lambda: load(cfg.eval))
        log(eval_report.summary("eval data"))
    return train_set, train_report, train_dialogs, eval_set, eval_report


def generate_samples(model, tokenizer, dialogs: list[dict], log) -> dict:
    """Greedy answers to the last user turn of some training dialogs, compared with the taught answers."""
    model.eval()
    results, matches = [], 0
    for dialog in dialogs:
        prompt, expected = dialog["messages"][:-1], dialog["messages"][-1]["content"].strip()
        ids = tokenizer.apply_chat_template(prompt, return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=64, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        matches += answer == expected
        results.append({"prompt": prompt[-1]["content"], "expected": expected, "answer": answer})
        log(f"  {prompt[-1]['content']!r} -> {answer!r}" + ("" if answer == expected else f"  (taught: {expected!r})"))
    log(f"greedy answers matching the taught ones: {matches}/{len(dialogs)}")
    return {"exact_match": matches, "total": len(dialogs), "results": results}


class CountingSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, counting the supervised, total and padding tokens of the training batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = {"supervised": 0, "tokens": 0, "padding": 0}

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.counts["supervised"] += int((inputs["labels"] != -100).sum())
            self.counts["tokens"] += inputs["input_ids"].numel()
            # the pad token is <unk>, which byte-fallback tokenizers never produce from text
            self.counts["padding"] += int((inputs["input_ids"] == self.processing_class.pad_token_id).sum())
        return super().compute_loss(model, inputs, *args, **kwargs)

