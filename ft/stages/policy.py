"""What PPO (ft/stages/ppo.py) and RLOO/GRPO (ft/stages/ppo_trl.py) start from: the tokenizer and the checked prompts
(`tokenizer_and_prompts`, rejection sampling's start too), the 4-bit base with the policy adapter and the reward source
(`load_policy`), and how many iterations a run has. A module of its own so that ppo.py can hand rloo/grpo to
ppo_trl.py without the two importing each other."""

from __future__ import annotations

import math

from ft import data, models, reward_model
from ft.recipe import Recipe


def tokenizer_and_prompts(recipe: Recipe, log):
    """The policy's tokenizer (its chat format) and the prompts of data.train, checked, those longer than
    data.max_length dropped and counted: what every stage that samples from prompts starts with (PPO, RLOO/GRPO,
    rejection sampling), before any model loads."""
    tokenizer = models.load_tokenizer(recipe.model.adapter or recipe.model.name,
                                     trust_remote_code=recipe.model.trust_remote_code, chat_format=recipe.model.chat_format)
    prompts, report = data.load_prompts(recipe.data.train, skip_invalid=recipe.data.skip_invalid, tokenizer=tokenizer,
                                        max_length=recipe.data.max_length)
    log(report.summary("prompts"))
    return tokenizer, prompts, report


def load_policy(recipe: Recipe, function, log):
    """Tokenizer, prompts (checked before any model loads), the 4-bit base with the policy adapter, and the reward
    source: (Rewards, the helpfulness model's score head, its adapter name), the heads and names None unless reward
    models share the base. PPO's and RLOO/GRPO's (ft/stages/ppo_trl.py) common start."""
    cfg = recipe.ppo
    tokenizer, prompts, report = tokenizer_and_prompts(recipe, log)
    model = models.attach_lora(models.load_model(recipe.model), recipe.lora, adapter=recipe.model.adapter,
                               gradient_checkpointing=recipe.train.gradient_checkpointing,
                               upcast_frozen=recipe.model.upcast_frozen)
    if function is not None:
        rewards = (reward_model.Rewards(function=function), None, None)
    else:
        rewards = reward_model.shared_rewards(model, tokenizer, recipe.model, cfg.reward_models, cfg.safety_model,
                                              threshold=cfg.safety_threshold, batch_size=cfg.generation_batch_size,
                                              log=log)
    return tokenizer, prompts, report, model, rewards


def iterations(recipe: Recipe, n_prompts: int) -> int:
    """train.max_steps iterations, or enough for train.epochs passes over the prompts."""
    return recipe.train.max_steps or max(1, math.ceil(recipe.train.epochs * n_prompts / recipe.ppo.batch_size))
