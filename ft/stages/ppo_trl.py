"""RLOO and GRPO (ppo.algorithm rloo | grpo) through TRL's trainers, on the same base, adapters, prompts and reward
as PPO (ft/stages/ppo.py's `run` dispatches here; ft/stages/policy.py's `load_policy` is the common start).

TRL samples ppo.samples_per_prompt answers per prompt and compares their rewards within each prompt's group, with
no value model. One iteration is ppo.batch_size prompts, so train.max_steps iterations are max_steps x
(ppo.epochs x answers / ppo.mini_batch_size) optimiser steps, and train.save_steps / train.logging_steps are
counted in iterations, as for PPO. The KL term is TRL's, with a fixed `beta` = ppo.kl_coef: TRL's RLOO/GRPO
trainers have no adaptive controller, so ppo.kl_target is refused here rather than dropped.
"""

from __future__ import annotations

import datasets
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from ft import models, reward_model, runs
from ft.errors import UserError
from ft.recipe import Recipe
from ft.stages import common
from ft.stages.policy import iterations, load_policy

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}


class TRLReward:
    """Our reward source as the one reward callable TRL's RLOO/GRPO trainers call: completions arrive as
    assistant messages; the score is the same as PPO's before whitening, minus the missing-</s> penalty
    (TRL normalises per prompt group itself)."""

    def __init__(self, rewards: reward_model.Rewards, eos_token_id: int, missing_eos_penalty: float):
        self.rewards, self.eos, self.penalty = rewards, eos_token_id, missing_eos_penalty
        self.__name__ = "llama_ft_reward"

    def __call__(self, prompts, completions, completion_ids=None, safety=None, **kwargs):
        texts = [c[-1]["content"].strip() if isinstance(c, list) else str(c).strip() for c in completions]
        raw, _ = self.rewards(prompts, texts, safety)
        ended = [self.eos in ids for ids in completion_ids] if completion_ids is not None else [True] * len(raw)
        return [r - (0 if e else self.penalty) for r, e in zip(raw, ended)]


def run(recipe: Recipe, function, *, resume: bool, log=print) -> dict:
    """ppo.algorithm rloo or grpo: TRL's trainer on the same base, adapters, prompts and reward (`function`, the
    loaded ppo.reward_function, or None for the reward models)."""
    cfg, t = recipe.ppo, recipe.train
    if cfg.kl_target is not None:  # refused, not ignored: the run would hold no KL budget although the recipe asks
        raise UserError(f"ppo.kl_target adapts PPO's beta; TRL's {cfg.algorithm} trainer has no such controller, only "
                        f"a fixed beta (ppo.kl_coef, passed as TRL's `beta`): start from recipes/grpo.yaml (`llama-ft "
                        f"recipes --copy grpo.yaml`), or set ppo.kl_target: null (--set ppo.kl_target=null) and "
                        f"ppo.kl_coef to the beta you want, or ppo.algorithm: ppo")
    out, checkpoint = common.start(recipe, resume=resume, log=log)
    tokenizer, prompts, report, model, (rewards, _, _) = load_policy(recipe, function, log)
    answers = cfg.batch_size * cfg.samples_per_prompt
    steps_per_iteration = cfg.epochs * answers // cfg.mini_batch_size
    arguments = common.trainer_arguments(recipe, out, has_eval=False)
    arguments.update(
        max_steps=iterations(recipe, len(prompts)) * steps_per_iteration,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=cfg.mini_batch_size // t.batch_size,
        save_steps=t.save_steps * steps_per_iteration,
        logging_steps=max(1, t.logging_steps * steps_per_iteration),
    )
    common_rl = dict(num_generations=cfg.samples_per_prompt, generation_batch_size=answers, num_iterations=cfg.epochs,
                     beta=cfg.kl_coef, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                     max_completion_length=cfg.max_new_tokens, epsilon=cfg.clip_range, disable_dropout=True,
                     remove_unused_columns=False)
    Config, Trainer = TRAINERS[cfg.algorithm]
    config = Config(**arguments, **common_rl)
    dataset = datasets.Dataset.from_list([{"prompt": p["prompt"], "safety": p["safety"]} for p in prompts])
    trainer = Trainer(model=model, reward_funcs=[TRLReward(rewards, tokenizer.eos_token_id, cfg.missing_eos_penalty)],
                      args=config, train_dataset=dataset, processing_class=tokenizer)
    models.keep_lora_float32(trainer.model)
    with common.measured() as measured:
        common.train(trainer, checkpoint)

    runs.save_final(out, lambda tmp: (trainer.model.save_pretrained(str(tmp), selected_adapters=["default"]),
                                      tokenizer.save_pretrained(str(tmp))))
    logged = [e for e in trainer.state.log_history if "reward" in e]
    history = [{"iteration": round(e["step"] / steps_per_iteration, 3), "reward": e["reward"],
                "kl": e.get("kl", 0.0), "answer_length": e.get("completions/mean_length")} for e in logged]
    metrics = {
        "stage": "ppo",
        "algorithm": cfg.algorithm,
        "global_step": trainer.state.global_step,
        "iterations": trainer.state.global_step // steps_per_iteration,
        "reward_first": history[0]["reward"] if history else None,
        "reward_last": history[-1]["reward"] if history else None,
        "kl_last": history[-1]["kl"] if history else None,
        "kl_target": None,  # TRL's beta is fixed
        "kl_coef_final": cfg.kl_coef,
        "history": history,
        "reward_sources": rewards.names,
        "resumed_from": checkpoint,
        **measured,
        "data": {"train": vars(report)},
    }
    runs.write_json(out / runs.METRICS_FILE, metrics)
    if history:
        log(f"reward {metrics['reward_first']:.4f} -> {metrics['reward_last']:.4f} over {metrics['iterations']} iterations")
    return metrics
