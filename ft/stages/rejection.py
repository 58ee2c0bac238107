"""Rejection-sampling fine-tuning, as in Llama 2-Chat: sample K answers per prompt, keep the best by reward, SFT on it.

1. prompts (data.train) -> the current policy (model.name + model.adapter) samples K answers each,
   in batches, with left padding (ft.sampling.generate);
2. the reward model (and the safety model) score every answer on the policy's own 4-bit base, as a frozen
   adapter + score head each (ft.reward_model; a reward model trained on another base is loaded on its own);
   with a safety model the score is combined as in Llama 2: the safety score when the prompt is flagged
   (`safety: true`) or its safety score (as a probability, sigmoid of the raw score) is below
   rejection.safety_threshold, else the helpfulness score;
3. samples.jsonl gets, per prompt, the best answer as a `messages` dialog (valid SFT input) with its
   score, every sample and every score; metrics.json the mean and the max reward over the K samples
   (the gap between them is what rejection sampling gains);
4. the sampling model is released and, unless --no-train, the SFT stage fine-tunes the policy on
   samples.jsonl, into output_dir/sft.
"""

from __future__ import annotations

import json

import torch

from ft import data, memory_use, models, reward_model, runs, sampling
from ft.errors import UserError
from ft.recipe import Recipe
from ft.stages import common, sft as sft_stage
from ft.stages.policy import tokenizer_and_prompts


def run(recipe: Recipe, *, resume: bool = False, train: bool = True, log=print) -> dict:
    if resume:
        raise UserError("rejection sampling has no checkpoints to resume; run it again into a new output_dir")
    out, _ = common.start(recipe, resume=False, log=log)
    cfg = recipe.rejection

    # 1. prompts, and the policy with the reward model(s) on one base
    tokenizer, prompts, _ = tokenizer_and_prompts(recipe, log)
    policy = models.attach_lora(models.load_model(recipe.model), recipe.lora,
                                adapter=recipe.model.adapter, gradient_checkpointing=False,
                                upcast_frozen=recipe.model.upcast_frozen)
    rewards, _, _ = reward_model.shared_rewards(policy, tokenizer, recipe.model, [cfg.reward_model], cfg.safety_model,
                                                threshold=cfg.safety_threshold, batch_size=cfg.batch_size, log=log)

    # 2. K samples per prompt, scored
    torch.manual_seed(recipe.train.seed)
    samples = []
    for i in range(0, len(prompts), cfg.batch_size):
        batch = [p["prompt"] for p in prompts[i:i + cfg.batch_size]]
        samples += [[c.text for c in answers] for answers in sampling.generate(
            policy, tokenizer, batch, n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)]
        log(f"sampled {min(i + cfg.batch_size, len(prompts))}/{len(prompts)} prompts x {cfg.k}")
    flat_prompts = [p["prompt"] for p, answers in zip(prompts, samples) for _ in answers]
    flat_answers = [a for answers in samples for a in answers]
    flags = [p["safety"] for p, answers in zip(prompts, samples) for _ in answers]
    combined, _ = rewards(flat_prompts, flat_answers, flags)
    del policy, rewards
    memory_use.free_models()

    # 3. keep the best answer of each prompt
    rows, means, maxes, k = [], [], [], cfg.k
    for i, prompt in enumerate(prompts):
        scores, answers = combined[i * k:(i + 1) * k], samples[i]
        best = max(range(k), key=scores.__getitem__)
        rows.append({"messages": prompt["prompt"] + [{"role": "assistant", "content": answers[best]}],
                     "score": scores[best], "samples": answers, "scores": scores, "origin": prompt["origin"]})
        means.append(sum(scores) / k)
        maxes.append(scores[best])
    empty = [r for r in rows if not r["messages"][-1]["content"].strip()]
    rows = [r for r in rows if r["messages"][-1]["content"].strip()]
    runs.write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = {
        "stage": "rejection",
        "prompts": len(prompts),
        "k": k,
        "mean_reward": sum(means) / len(means),
        "mean_max_reward": sum(maxes) / len(maxes),
        "gain": sum(maxes) / len(maxes) - sum(means) / len(means),
        "dropped_empty_best": len(empty),
        "scoring": "helpfulness and safety combined" if cfg.safety_model else "helpfulness",
    }
    log(f"reward over {k} samples per prompt: mean {metrics['mean_reward']:.3f}, max {metrics['mean_max_reward']:.3f} "
        f"(gain {metrics['gain']:.3f}); {len(rows)} best answers in {out / 'samples.jsonl'}"
        + (f"; {len(empty)} prompts dropped (best answer empty)" if empty else ""))

    # 4. fine-tune on the kept answers
    if train:
        sft_recipe = recipe.model_copy(update={"stage": "sft", "rejection": None, "output_dir": str(out / "sft"),
                                               "data": recipe.data.model_copy(update={
                                                   "train": [data.DataSource(path=str(out / "samples.jsonl"), format="messages")],
                                                   "eval": None})})
        metrics["sft"] = {"output_dir": str(out / "sft"), "loss_last": sft_stage.run(sft_recipe, log=log)["loss_last"]}
    runs.write_json(out / runs.METRICS_FILE, metrics)
    return metrics
