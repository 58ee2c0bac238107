"""Reward model: preference pairs -> tokenizer -> 4-bit base + LoRA + scalar score head -> TRL RewardTrainer.

The loss is Llama 2's binary ranking loss with a margin, -log σ(r(chosen) - r(rejected) - m), where
m comes from the pair's preference strength (reward.margin: small or large), from the row
(reward.margin: row), or is 0. The score head is trained in full and saved with the adapter; the
reward is read at the final </s> of the chat-formatted answer. Metrics: pairwise accuracy on the
eval split (the training data if there is none), overall and per strength level.
"""

from __future__ import annotations

from trl import RewardConfig, RewardTrainer

from ft import data, distributed, models, runs
from ft.reward_model import Scorer, render
from ft.errors import UserError
from ft.recipe import Recipe
from ft.stages import common


def run(recipe: Recipe, *, resume: bool = False, log=print) -> dict:
    out, checkpoint = common.start(recipe, resume=resume, log=log)

    # 1. tokenizer and pairs, checked before the model is loaded
    tokenizer = models.load_tokenizer(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    cfg, mode = recipe.data, recipe.reward.margin
    def load():  # once, for every process
        pairs, report = data.load_pairs(cfg.train, skip_invalid=cfg.skip_invalid)
        held_out = data.load_pairs(cfg.eval, skip_invalid=cfg.skip_invalid)[0] if cfg.eval else None
        return pairs, report, held_out, tokenize_pairs(pairs, tokenizer, cfg.max_length, mode, report)

    train_pairs, train_report, eval_pairs, train_set = distributed.on_main(load)
    log(train_report.summary("train pairs"))
    if mode in ("small", "large") and not any(p["strength"] for p in train_pairs):
        log(f"note: reward.margin {mode} but no row has a strength: every margin is 0")
    batch = common.batch_report(recipe, log)

    # 2. model: 4-bit base with a score head, LoRA
    base = models.load_model(recipe.model, reward=True)
    model = models.attach_lora(base, recipe.lora, adapter=recipe.model.adapter,
                               gradient_checkpointing=recipe.train.gradient_checkpointing, reward=True,
                               upcast_frozen=recipe.model.upcast_frozen)

    # 3. train
    config = RewardConfig(**common.trainer_arguments(recipe, out, has_eval=False), max_length=cfg.max_length,
                          center_rewards_coefficient=None)
    trainer = RewardTrainer(model=model, args=config, train_dataset=train_set, processing_class=tokenizer)
    models.keep_lora_float32(trainer.model)
    with common.measured() as measured:
        common.train(trainer, checkpoint)

    # 4. save, evaluate, metrics last
    runs.save_final(out, lambda tmp: common.save_adapter(trainer, tmp))
    evaluated = eval_pairs or train_pairs
    accuracy = distributed.on_main(lambda: pairwise_accuracy(Scorer(trainer.model, tokenizer), evaluated)) \
        if not distributed.is_sharded() else None  # sharded weights: score the saved run with `score`
    metrics = {
        "stage": "reward",
        "margin": mode,
        "global_step": trainer.state.global_step,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "accuracy": accuracy,
        "accuracy_split": "eval" if eval_pairs else "train (no data.eval given)",
        **measured,
        **batch,
        "data": {"train": vars(train_report)},
    }
    runs.write_json(out / runs.METRICS_FILE, metrics)
    acc = metrics["accuracy"]
    if acc:
        log(f"pairwise accuracy on {metrics['accuracy_split']}: {acc['overall']:.1%} of {acc['pairs']} pairs; "
            + ", ".join(f"{k} {v['accuracy']:.0%} ({v['pairs']})" for k, v in acc["by_strength"].items()))
    return metrics


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int, mode: str, report: data.Report):
    """chosen_ids / rejected_ids (chat-formatted, ending with </s>) and margins, as RewardTrainer takes them."""
    import datasets

    rows = []
    for pair in pairs:
        chosen = render(tokenizer, pair["prompt"], pair["chosen"])
        rejected = render(tokenizer, pair["prompt"], pair["rejected"])
        if max(len(chosen), len(rejected)) > max_length:  # the reward is read at </s>: never truncate it away
            report.dropped_too_long += 1
            continue
        row = {"chosen_ids": chosen, "rejected_ids": rejected}
        if mode != "none":
            row["margin"] = data.pair_margin(pair, mode)
        rows.append(row)
    report.examples = len(rows)
    if not rows:
        raise UserError(f"every pair is longer than data.max_length={max_length}")
    if report.dropped_too_long:
        report.notes.append(f"{report.dropped_too_long} pairs longer than data.max_length={max_length} dropped")
    return datasets.Dataset.from_list(rows)


def pairwise_accuracy(scorer: Scorer, pairs: list[dict]) -> dict:
    chosen = scorer([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    right = [c > r for c, r in zip(chosen, rejected)]
    by_strength = {}
    for level in data.STRENGTHS + (None,):
        picked = [ok for ok, p in zip(right, pairs) if p["strength"] == level]
        if picked:
            by_strength[level or "unlabelled"] = {"accuracy": sum(picked) / len(picked), "pairs": len(picked)}
    return {"overall": sum(right) / len(right), "pairs": len(right), "by_strength": by_strength,
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(right)}
