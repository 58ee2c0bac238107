"""Rejection-sampling fine-tuning, as in Llama 2-Chat: sample K answers per prompt, keep the best by reward, SFT on it.

1. prompts (data.train) -> the current policy (model.name + model.adapter) samples K answers each,
   in batches, with left padding;
2. the policy is released, then the reward model scores every answer (one model in memory at a time,
   so a 7B pipeline stays within a T4); with a safety model too, the score is combined as in Llama 2:
   the safety score when the prompt is flagged (`safety: true`) or its safety score (as a probability,
   sigmoid of the raw score) is below rejection.safety_threshold, else the helpfulness score;
3. samples.jsonl gets, per prompt, the best answer as a `messages` dialog (valid SFT input) with its
   score, every sample and every score; metrics.json the mean and the max reward over the K samples
   (the gap between them is what rejection sampling gains);
4. unless --no-train, the SFT stage fine-tunes the policy on samples.jsonl, into output_dir/sft.
"""

from __future__ import annotations

import gc
import json
import math

import torch

from ft import data, models, runs
from ft.errors import UserError
from ft.recipe import Recipe
from ft.stages import reward as reward_stage
from ft.stages import sft as sft_stage


def run(recipe: Recipe, *, resume: bool = False, train: bool = True, log=print) -> dict:
    if resume:
        raise UserError("rejection sampling has no checkpoints to resume; run it again into a new output_dir")
    out, _ = runs.prepare(recipe, resume=resume)
    cfg = recipe.rejection

    # 1. prompts and samples from the current policy
    prompts, report = data.load_prompts(recipe.data.train, skip_invalid=recipe.data.skip_invalid)
    log(report.summary("prompts"))
    samples = sample(recipe, prompts, log)

    # 2. scores, one model in memory at a time
    flat_prompts = [p["prompt"] for p, answers in zip(prompts, samples) for _ in answers]
    flat_answers = [a for answers in samples for a in answers]
    helpful = _score_with(cfg.reward_model, flat_prompts, flat_answers)
    safety = _score_with(cfg.safety_model, flat_prompts, flat_answers) if cfg.safety_model else None
    flags = [p["safety"] for p, answers in zip(prompts, samples) for _ in answers]
    combined = combine(helpful, safety, flags, cfg.safety_threshold)

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
        "scoring": "helpfulness and safety combined" if safety is not None else "helpfulness",
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


def sample(recipe: Recipe, prompts: list[dict], log) -> list[list[str]]:
    """K sampled answers per prompt from the policy, which is released afterwards."""
    from peft import PeftModel

    cfg = recipe.rejection
    adapter = recipe.model.adapter
    tokenizer = models.load_tokenizer(adapter or recipe.model.name, padding_side="left",
                                     trust_remote_code=recipe.model.trust_remote_code)
    policy = models.load_model(recipe.model.model_copy(update={"adapter": None}))
    if adapter:
        policy = PeftModel.from_pretrained(policy, adapter)
    policy.eval()
    torch.manual_seed(recipe.train.seed)
    samples = []
    for i in range(0, len(prompts), cfg.batch_size):
        batch = [tokenizer.apply_chat_template(p["prompt"], tokenize=False) for p in prompts[i:i + cfg.batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.device)
        with torch.no_grad():
            out = policy.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.k,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        samples += [[t.strip() for t in texts[j * cfg.k:(j + 1) * cfg.k]] for j in range(len(batch))]
        log(f"sampled {min(i + cfg.batch_size, len(prompts))}/{len(prompts)} prompts x {cfg.k}")
    del policy
    _free()
    return samples


def _score_with(run_dir: str, prompts: list, answers: list) -> list[float]:
    scorer = reward_stage.Scorer.load(run_dir)
    scores = scorer(prompts, answers)
    del scorer
    _free()
    return scores


def combine(helpful: list[float], safety: list[float] | None, flags: list[bool], threshold: float) -> list[float]:
    """Llama 2's Rc: the safety score if the prompt is flagged or sigmoid(safety) < threshold, else helpfulness."""
    if safety is None:
        return list(helpful)
    return [s if flag or 1 / (1 + math.exp(-s)) < threshold else h for h, s, flag in zip(helpful, safety, flags)]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
