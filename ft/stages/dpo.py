"""DPO: preference pairs -> tokenizer -> 4-bit base + the SFT adapter -> TRL DPOTrainer -> run folder.

The policy starts from an SFT run (`model.adapter`) or from a merged model (`model.name`, a new
adapter). The reference policy costs no second copy of the 4-bit weights: starting from an SFT
adapter, a frozen copy of that adapter is loaded beside the trained one under the name "ref" (TRL
switches to it for the reference pass), so the reference is the SFT model itself; starting from a
merged model, the reference is the same base with the adapter disabled.
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from ft import data, distributed, models, runs
from ft.recipe import Recipe
from ft.stages import common


def run(recipe: Recipe, *, resume: bool = False, log=print) -> dict:
    out, checkpoint = common.start(recipe, resume=resume, log=log)

    # 1. tokenizer (the SFT run's, if starting from one) and pairs
    adapter = recipe.model.adapter
    tokenizer = models.load_tokenizer(adapter or recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    cfg = recipe.data
    train_pairs, train_report, eval_pairs = distributed.on_main(lambda: (  # once, for every process
        *data.load_pairs(cfg.train, skip_invalid=cfg.skip_invalid),
        data.load_pairs(cfg.eval, skip_invalid=cfg.skip_invalid)[0] if cfg.eval else None))
    log(train_report.summary("train pairs"))
    batch = common.batch_report(recipe, log)

    # 2. policy = base + trainable adapter; TRL adds a frozen copy of it as the "ref" adapter
    base = models.load_model(recipe.model)
    model = models.attach_lora(base, recipe.lora, adapter=adapter, gradient_checkpointing=recipe.train.gradient_checkpointing,
                               upcast_frozen=recipe.model.upcast_frozen)

    # 3. train
    config = DPOConfig(**common.trainer_arguments(recipe, out, has_eval=eval_pairs is not None),
                       beta=recipe.dpo.beta, max_length=cfg.max_length, **loss_arguments(recipe.dpo))
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=as_dataset(train_pairs),
                         eval_dataset=as_dataset(eval_pairs) if eval_pairs else None, processing_class=tokenizer)
    models.keep_lora_float32(trainer.model)
    with common.measured() as measured:
        common.train(trainer, checkpoint)

    # 4. save the trained adapter (not the frozen reference), then metrics
    runs.save_final(out, lambda tmp: common.save_adapter(trainer, tmp, adapters=["default"]))
    metrics = {
        "stage": "dpo",
        "beta": recipe.dpo.beta,
        "loss_type": recipe.dpo.loss_type,
        "sft_weight": recipe.dpo.sft_weight,
        "reference": "frozen copy of the SFT adapter" if adapter else "the base (new adapter starts at zero)",
        "global_step": trainer.state.global_step,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        **measured,
        **batch,
        "data": {"train": vars(train_report)},
    }
    if eval_pairs:
        results = trainer.evaluate()
        metrics["eval"] = {k.removeprefix("eval_"): v for k, v in results.items()
                           if "rewards" in k or k in ("eval_loss",)}
        log(f"eval: reward accuracy {results.get('eval_rewards/accuracies', float('nan')):.1%}, "
            f"reward margin {results.get('eval_rewards/margins', float('nan')):.3f}")
    runs.write_json(out / runs.METRICS_FILE, metrics)
    return metrics


def loss_arguments(dpo) -> dict:
    """TRL's loss_type list: the DPO loss, plus the chosen answers' NLL when dpo.sft_weight > 0."""
    if dpo.sft_weight > 0:
        return {"loss_type": [dpo.loss_type, "sft"], "loss_weights": [1.0, dpo.sft_weight]}
    return {"loss_type": [dpo.loss_type]}


def as_dataset(pairs: list[dict]):
    """Conversational prompt/chosen/rejected rows: TRL renders them with the tokenizer's (Llama 2) template."""
    import datasets

    return datasets.Dataset.from_list([
        {"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in pairs
    ])
