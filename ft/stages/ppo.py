"""PPO as in Llama 2-Chat, on one 4-bit base; RLOO and GRPO (ppo.algorithm) go through TRL in ft/stages/ppo_trl.py.

One copy of the 4-bit base weights carries every model PPO needs, each a LoRA adapter:
  default      the policy, trained (it starts as the SFT run's adapter, model.adapter);
  reference    a frozen copy of that same adapter (with adapters merely disabled the reference would be
               the pre-SFT base);
  value        the value model, trained, with a scalar head (it starts as the helpfulness reward model's
               adapter and score head when it shares the base, else as a new adapter and a zero head);
  rm_*         each reward model (ppo.reward_models, ppo.safety_model), frozen, with its score head.
Switching adapter never changes what is trainable (models.use_adapter), and the optimiser's parameter
groups are picked by adapter name. With gradient checkpointing the backward pass recomputes a layer with
the adapter active at that moment, so each loss is back-propagated before the next adapter is switched to.

One iteration (train.max_steps of them):
 1. rollout: ppo.batch_size prompts x ppo.samples_per_prompt answers, sampled by the policy in eval mode
    (KV cache, no checkpointing) with ppo.temperature / ppo.top_p, up to ppo.max_new_tokens;
 2. reward: Llama 2's Rc (the safety score if the prompt is flagged or sigmoid(safety) < threshold, else
    helpfulness) on the chat-formatted prompt + answer + </s>, whitened over the iteration (our reward heads
    output the logit directly, so logit(Rc) is the raw score), minus ppo.missing_eos_penalty for an answer
    without </s>; or a Python reward function;
 3. old log-probs, reference log-probs and values with the training forward (fp32 log-softmax of logits /
    temperature), in the same micro-batches as the first training pass: iteration 0's ratio is exactly 1;
 4. per-token reward -beta * (log pi - log pi_ref), plus the score on the answer's last token; GAE with
    ppo.gamma and ppo.lam, 0 after </s>; advantages whitened over the answer tokens. beta is ppo.kl_coef, or with
    ppo.kl_target it adapts after each iteration (rl.adaptive_kl_coef, kept in the checkpoint's state);
 5. ppo.epochs passes of clipped policy loss + ppo.vf_coef x clipped value loss, one optimiser step per
    ppo.mini_batch_size answers (train.batch_size per forward pass), AdamW from train:, dropout off.
A step with a non-finite loss or gradient is skipped and counted. When the KL to the reference runs past
KL_WARN_FACTOR x ppo.kl_target (KL_WARN_NATS with a fixed beta) or one answer is given to most of an iteration's
prompts, the log says so once per run, with the numbers and the keys to change (`runaway_warnings`). A checkpoint every train.save_steps
iterations; --resume continues at that iteration boundary, bit-exactly on the CPU (each iteration reseeds
from train.seed + its number). The maths of 4 and 5 is in ft/rl.py, sampling in ft/sampling.py, the reward
in ft/reward_model.py; this module is the loop (`fit`, one `PPO.iteration` after another) and what is
around it (`run`: the run folder, progress, TensorBoard, checkpoints, metrics).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments, get_scheduler, set_seed
from trl.trainer.utils import disable_dropout_in_model

from ft import data, models, reward_model, rl, runs, sampling
from ft.errors import Interrupted, UserError
from ft.recipe import Recipe
from ft.rl import Rollout
from ft.stages import common

VALUE_HEAD_FILE = "value_head.safetensors"
STEP_STATISTICS = ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "ratio", "entropy")  # per token, per step
KL_WARN_FACTOR = 3.0  # with ppo.kl_target: warn when the KL per answer passes this many times the target
KL_WARN_NATS = 10.0  # with a fixed beta: warn past this KL per answer (gameable rewards are hacked within a few nats)
COLLAPSE_SHARE = 0.5  # warn when one answer text is given to more than this share of an iteration's prompts (>= 3 of them)


def run(recipe: Recipe, *, resume: bool = False, log=print) -> dict:
    cfg, t = recipe.ppo, recipe.train
    function = reward_model.load_reward_function(cfg.reward_function) if cfg.reward_function else None  # fail early
    if cfg.algorithm != "ppo":
        from ft.stages import ppo_trl  # imported here: ppo_trl builds on this module's load_policy

        return ppo_trl.run(recipe, function, resume=resume, log=log)
    out, checkpoint = common.start(recipe, resume=resume, log=log)

    # 1. prompts (checked first), then one 4-bit base with the policy, reference, value and reward adapters
    ppo, prompts, report, eval_prompts = setup(recipe, function, log)
    total = iterations(recipe, len(prompts))

    # 2. the iterations, from a checkpoint if resuming
    state = ppo.load(Path(checkpoint)) if checkpoint else {"iteration": 0, "history": [], "skipped_steps": 0}
    state.setdefault("kl_coef", cfg.kl_coef)  # beta for the next iteration (a checkpoint of before ppo.kl_target: fixed)
    state.setdefault("warnings", [])
    writer = tensorboard(recipe, out)
    eval_start = state.get("eval_start")
    if eval_prompts and checkpoint is None:
        eval_start = state["eval_start"] = ppo.evaluate(eval_prompts)
        log(f"eval prompts: mean reward of greedy answers {eval_start:.4f} before training")
    with common.measured() as measured, common.interruptible() as stopper:
        after = AfterIteration(ppo, recipe, out, state, total, writer, stopper, log)
        fit(ppo, prompts, state, total, seed=t.seed, after_iteration=after)
    after.bar.close()
    if writer is not None:
        writer.close()

    # 3. the policy adapter (the run's adapter), the value model beside it, the tokenizer; metrics last
    runs.save_final(out, lambda tmp: (ppo.save_models(tmp), ppo.tokenizer.save_pretrained(str(tmp))))
    history = state["history"]
    metrics = {
        "stage": "ppo",
        "algorithm": "ppo",
        "global_step": state["iteration"],
        "iterations": state["iteration"],
        "reward_first": history[0]["reward"] if history else None,
        "reward_last": history[-1]["reward"] if history else None,
        "kl_last": history[-1]["kl"] if history else None,
        "kl_target": cfg.kl_target,
        "kl_coef_final": state["kl_coef"],  # beta after the last update (= ppo.kl_coef without ppo.kl_target)
        "history": history,
        "skipped_steps": state["skipped_steps"],
        "warnings": state["warnings"],
        "reward_sources": ppo.rewards.names,
        "value_init": ppo.value_init,
        "resumed_from": checkpoint,
        **measured,
        "data": {"train": vars(report)},
    }
    if eval_prompts:
        metrics["eval"] = {"reward_start": eval_start, "reward_end": ppo.evaluate(eval_prompts), "prompts": len(eval_prompts)}
        log(f"eval prompts: mean reward of greedy answers {eval_start:.4f} -> {metrics['eval']['reward_end']:.4f}")
    runs.write_json(out / runs.METRICS_FILE, metrics)
    if history:
        log(f"reward {metrics['reward_first']:.4f} -> {metrics['reward_last']:.4f} over {len(history)} iterations "
            f"(KL to the reference {metrics['kl_last']:.4f})")
    return metrics


def fit(ppo: PPO, prompts: list[dict], state: dict, total: int, *, seed: int, after_iteration) -> None:
    """Iterations state["iteration"] .. total - 1, each on its slice of the prompts (`prompt_indices`) and reseeded
    from seed + its number first, so that a resumed run samples the same rollouts; `state` (what a checkpoint
    saves) counts the iterations and skipped steps, keeps each iteration's metrics and beta for the next
    iteration (state["kl_coef"], adapted after each iteration when ppo.kl_target is set); `after_iteration(metrics)`
    is called after each (progress, logging, checkpoints: `run`'s)."""
    cfg = ppo.cfg
    for iteration in range(state["iteration"], total):
        set_seed(seed + iteration)
        stats = ppo.iteration([prompts[i] for i in prompt_indices(iteration, cfg.batch_size, len(prompts), seed)],
                              kl_coef=state["kl_coef"])
        state["skipped_steps"] += stats.pop("skipped_steps")
        state["history"].append({"iteration": iteration + 1, **stats})
        state["iteration"] = iteration + 1
        if cfg.kl_target is not None:  # the KL the controller holds: per answer, as stats["kl"] and metrics' kl_last
            state["kl_coef"] = rl.adaptive_kl_coef(state["kl_coef"], stats["kl"], cfg.kl_target,
                                                   cfg.batch_size * cfg.samples_per_prompt, cfg.kl_horizon)
        after_iteration(stats)


class AfterIteration:
    """What `run` does after each iteration, apart from the loop: the iteration's metrics to TensorBoard
    (train.report_to), the progress bar, a log line at the first and every train.logging_steps-th, each of
    `runaway_warnings` the first time it applies (kept in state["warnings"], so once per run, resumed or not), and
    checkpoint-N/ every train.save_steps (not after the last: the run's final save follows), and after a
    SIGINT/SIGTERM a checkpoint at this iteration boundary, then Interrupted (the CLI prints the --resume command)."""

    def __init__(self, ppo: PPO, recipe: Recipe, out: Path, state: dict, total: int, writer, stopper, log):
        self.ppo, self.train, self.out, self.state, self.total = ppo, recipe.train, out, state, total
        self.writer, self.stopper, self.log = writer, stopper, log
        self.bar = tqdm(total=total, initial=state["iteration"], desc="ppo", unit="it")

    def __call__(self, stats: dict) -> None:
        done = self.state["iteration"]
        for key, value in stats.items():
            if self.writer is not None:
                self.writer.add_scalar(f"ppo/{key}", value, done)
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}", beta=f"{stats['kl_coef']:.4g}",
                             refresh=False)
        if done == 1 or done % self.train.logging_steps == 0:
            self.log(f"iteration {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        given = {w["kind"] for w in self.state["warnings"]}
        for kind, message in runaway_warnings(stats, self.ppo.cfg, self.train, done, self.state["kl_coef"], self.ppo.common_answer):
            if kind not in given:
                self.state["warnings"].append({"kind": kind, "iteration": done, "message": message})
                self.log(f"warning: {message}")
        if self.stopper.signum is not None or (done != self.total and done % self.train.save_steps == 0):
            saved = self.ppo.save_checkpoint(self.out, self.state)
            if self.stopper.signum is not None:
                self.bar.close()
                raise Interrupted(str(saved), self.stopper.signum)


def runaway_warnings(stats: dict, cfg, train, iteration: int, next_kl_coef: float, common_answer: str) -> list[tuple[str, str]]:
    """(kind, message) for each sign in one iteration's metrics that PPO is running away from its reference:
    "kl", the KL per answer past KL_WARN_FACTOR x ppo.kl_target (past KL_WARN_NATS with a fixed beta); "collapse",
    one answer (`common_answer`) given to more than COLLAPSE_SHARE of the iteration's prompts. Each message has the
    numbers and the recipe keys to change."""
    out, kl, beta = [], stats["kl"], stats["kl_coef"]
    lr = f"train.learning_rate ({train.learning_rate:g})"
    if cfg.kl_target is not None and kl > KL_WARN_FACTOR * cfg.kl_target:
        out.append(("kl", f"iteration {iteration}: the KL to the reference is {kl:.2f} nats per answer, "
                          f"{kl / cfg.kl_target:.1f}x ppo.kl_target {cfg.kl_target:g}, and beta has only reached "
                          f"{next_kl_coef:.4g} (from ppo.kl_coef {cfg.kl_coef:g}): the policy moves faster than the "
                          f"controller follows. Lower {lr}, raise ppo.kl_coef (the starting beta) or lower "
                          f"ppo.kl_horizon ({cfg.kl_horizon}) so that beta adapts sooner."))
    elif cfg.kl_target is None and kl > KL_WARN_NATS:
        out.append(("kl", f"iteration {iteration}: the KL to the reference is {kl:.2f} nats per answer with a fixed "
                          f"beta ppo.kl_coef {cfg.kl_coef:g}: on a reward that can be gamed the answers drift off task within "
                          f"a few nats. Set ppo.kl_target (e.g. 1-2 nats) so that beta adapts to hold it, or raise "
                          f"ppo.kl_coef, or lower {lr}."))
    share = stats["same_answer_share"]
    prompts = cfg.batch_size
    if share > COLLAPSE_SHARE and share * prompts >= 3:
        out.append(("collapse", f"iteration {iteration}: {round(share * prompts)} of {prompts} prompts got the same "
                                f"answer, {common_answer[:80]!r} (mean reward {stats['reward']:.3f}, KL {kl:.2f} nats, "
                                f"beta {beta:.4g}): the policy has probably found a way to game the reward. Check the "
                                f"reward source on such answers; hold the policy nearer its reference with a smaller "
                                f"ppo.kl_target{f' ({cfg.kl_target:g})' if cfg.kl_target is not None else ''}, a larger "
                                f"ppo.kl_coef ({cfg.kl_coef:g}) or a lower {lr}."))
    return out


def setup(recipe: Recipe, function=None, log=print):
    """Tokenizer, prompts (checked before any model loads), and the PPO object on one 4-bit base with its adapters."""
    tokenizer, prompts, report, model, (rewards, rm_head, rm_adapter) = load_policy(recipe, function, log)
    eval_prompts = load_prompts(recipe.data.eval, tokenizer, recipe.data)[0] if recipe.data.eval else None
    models.add_adapter(model, "reference", copy_of="default")
    if rm_adapter is not None:
        models.add_adapter(model, "value", copy_of=rm_adapter, trainable=True)
    else:
        models.add_adapter(model, "value", lora=runs.trained_lora(recipe), trainable=True)
    value_head = torch.nn.Linear(model.config.hidden_size, 1, bias=False, device=model.device, dtype=torch.float32)
    with torch.no_grad():
        value_head.weight.copy_(rm_head if rm_head is not None else torch.zeros_like(value_head.weight))
    disable_dropout_in_model(model)  # PPO's ratios and values need deterministic forwards (LoRA's dropout too)
    ppo = PPO(model, value_head, tokenizer, rewards, recipe, iterations(recipe, len(prompts)))
    ppo.value_init = "helpfulness reward model" if rm_adapter else "new adapter, zero head"
    log(f"on one base: policy, reference, value ({ppo.value_init}), reward: {', '.join(rewards.names)}")
    return ppo, prompts, report, eval_prompts


def load_policy(recipe: Recipe, function, log):
    """Tokenizer, prompts (checked before any model loads), the 4-bit base with the policy adapter, and the reward
    source: (Rewards, the helpfulness model's score head, its adapter name), the heads and names None unless reward
    models share the base. PPO's and RLOO/GRPO's (ft/stages/ppo_trl.py) common start."""
    cfg = recipe.ppo
    tokenizer = models.load_tokenizer(recipe.model.adapter or recipe.model.name,
                                     trust_remote_code=recipe.model.trust_remote_code)
    prompts, report = load_prompts(recipe.data.train, tokenizer, recipe.data)
    log(report.summary("prompts"))
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


# ---------------------------------------------------------------- PPO on the shared base


class PPO:
    """The rollout and the update of one iteration, on a PeftModel with adapters default/reference/value."""

    def __init__(self, model, value_head, tokenizer, rewards: reward_model.Rewards, recipe: Recipe,
                 total_iterations: int):
        self.model, self.value_head, self.tokenizer, self.rewards = model, value_head, tokenizer, rewards
        self.cfg, self.recipe = recipe.ppo, recipe
        self.common_answer = ""  # the last iteration's most common answer text, for the collapse warning
        policy = [p for n, p in model.named_parameters() if ".default." in n]
        value = [p for n, p in model.named_parameters() if ".value." in n] + list(value_head.parameters())
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not policy or any(".default." not in n and ".value." not in n for n in trainable):
            raise RuntimeError(f"unexpected trainable parameters: {trainable[:4]}")
        self.params = policy + value
        optimizer_cls, optimizer_kwargs = optimizer_class(recipe)
        self.optimizer = optimizer_cls([{"params": policy, "name": "policy"}, {"params": value, "name": "value"}],
                                       **optimizer_kwargs)
        per_iteration = self.cfg.epochs * self.cfg.batch_size * self.cfg.samples_per_prompt // self.cfg.mini_batch_size
        steps = total_iterations * per_iteration
        self.scheduler = get_scheduler(recipe.train.lr_scheduler, self.optimizer,
                                       num_warmup_steps=int(recipe.train.warmup_ratio * steps),
                                       num_training_steps=steps,
                                       scheduler_specific_kwargs={"min_lr_rate": recipe.train.min_lr_ratio}
                                       if recipe.train.lr_scheduler == "cosine_with_min_lr" else None)

    # ---- one iteration: rollout -> advantages -> ppo.epochs passes of updates -> metrics

    def iteration(self, prompt_rows: list[dict], kl_coef: float | None = None) -> dict:
        """One iteration with KL coefficient `kl_coef` (ppo.kl_coef by default); its metrics."""
        cfg = self.cfg
        kl_coef = cfg.kl_coef if kl_coef is None else kl_coef
        rollout = self.collect(prompt_rows)
        order = [torch.randperm(rollout.n) for _ in range(cfg.epochs)]
        self.score(rollout, order[0], kl_coef)
        steps, skipped = [], 0
        self.model.train()
        for epoch in range(cfg.epochs):
            for start in range(0, rollout.n, cfg.mini_batch_size):
                step = self.step(rollout, order[epoch][start:start + cfg.mini_batch_size])
                if step is None:
                    skipped += 1
                else:
                    steps.append(step)
        learning_rate = self.scheduler.get_last_lr()[0]
        return {**self.metrics(rollout, steps), "kl_coef": kl_coef, "learning_rate": learning_rate,
                "skipped_steps": skipped}

    def collect(self, prompt_rows: list[dict]) -> Rollout:
        """Sample answers, score them, and lay them out as [left-padded prompt | right-padded answer] rows."""
        cfg, tokenizer = self.cfg, self.tokenizer
        with models.use_adapter(self.model, "default"):
            samples = sampling.generate(self.model, tokenizer, [r["prompt"] for r in prompt_rows],
                                        n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size)
        rows = [(row, c) for row, answers in zip(prompt_rows, samples) for c in answers]
        raw, parts = self.rewards([r["prompt"] for r, _ in rows], [c.text for _, c in rows], [r["safety"] for r, _ in rows])
        ended = [c.ended for _, c in rows]
        score = torch.tensor(raw, dtype=torch.float32)
        if cfg.whiten_rewards and len(raw) > 1:
            score = rl.whiten(score)
        score = score - cfg.missing_eos_penalty * (~torch.tensor(ended)).float()
        width_p = max(len(c.prompt_ids) for _, c in rows)
        width_a = max(max(len(c.ids) for _, c in rows), 1)
        input_ids = torch.full((len(rows), width_p + width_a), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, (_, c) in enumerate(rows):
            input_ids[i, width_p - len(c.prompt_ids):width_p] = torch.tensor(c.prompt_ids)
            input_ids[i, width_p:width_p + len(c.ids)] = torch.tensor(c.ids, dtype=torch.long)
            attention[i, width_p - len(c.prompt_ids):width_p + len(c.ids)] = 1
        device = self.model.device
        return Rollout(input_ids=input_ids.to(device), attention_mask=attention.to(device), prompt_width=width_p,
                       mask=attention[:, width_p:].bool().to(device), raw=raw, parts=parts, ended=ended,
                       score=score.to(device), texts=[c.text for _, c in rows])

    def score(self, rollout: Rollout, first_order: torch.Tensor, kl_coef: float | None = None) -> None:
        """Old and reference log-probs, values, per-token rewards (KL coefficient `kl_coef`, ppo.kl_coef by default),
        advantages and returns of a rollout (set on it)."""
        cfg, mask = self.cfg, rollout.mask
        logp_old, logp_ref, values = (torch.zeros(mask.shape, device=mask.device) for _ in range(3))
        self.model.train()  # the training forward (dropout is off): the first update sees ratio 1 exactly
        micro = self.recipe.train.batch_size
        with torch.no_grad():
            for start in range(0, rollout.n, micro):
                rows = first_order[start:start + micro]
                with models.use_adapter(self.model, "default"):
                    logp_old[rows] = self.logprobs(rollout, rows)[0]
                with models.use_adapter(self.model, "reference"):
                    logp_ref[rows] = self.logprobs(rollout, rows)[0]
                with models.use_adapter(self.model, "value"):
                    values[rows] = self.values(rollout, rows)
        rollout.logp_old, rollout.logp_ref, rollout.values = (t * mask for t in (logp_old, logp_ref, values))
        rollout.token_rewards = rl.per_token_rewards(rollout.score, rollout.logp_old, rollout.logp_ref, mask,
                                                     kl_coef=cfg.kl_coef if kl_coef is None else kl_coef)
        advantages, rollout.returns = rl.gae(rollout.token_rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        rollout.advantages = rl.whiten(advantages, mask)

    def step(self, rollout: Rollout, rows: torch.Tensor) -> dict | None:
        """One optimiser step on the answers `rows`, train.batch_size per forward pass; None if skipped.
        Losses are summed over answer tokens and divided by the mini-batch's token count."""
        cfg, micro = self.cfg, self.recipe.train.batch_size
        tokens = rollout.mask[rows].sum().clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(STEP_STATISTICS, 0.0)
        for start in range(0, len(rows), micro):
            part = rows[start:start + micro]
            mask = rollout.mask[part]
            with models.use_adapter(self.model, "default"):  # backward before switching: see the module docstring
                logp, entropy = self.logprobs(rollout, part, with_entropy=True)
                losses, ratio, clipped = rl.policy_loss(logp, rollout.logp_old[part], rollout.advantages[part],
                                                        cfg.clip_range)
                ((losses * mask).sum() / tokens).backward()
            with models.use_adapter(self.model, "value"):
                v_losses = rl.value_loss(self.values(rollout, part), rollout.values[part], rollout.returns[part],
                                         cfg.value_clip_range)
                (cfg.vf_coef * (v_losses * mask).sum() / tokens).backward()
            log_ratio = logp.detach() - rollout.logp_old[part]
            for key, per_token in (("policy_loss", losses.detach()), ("value_loss", v_losses.detach()),
                                   ("clip_fraction", clipped.float()), ("approx_kl", 0.5 * log_ratio ** 2),
                                   ("ratio", ratio), ("entropy", entropy)):
                sums[key] += (per_token * mask).sum().item()
        stats = {key: total / tokens.item() for key, total in sums.items()}
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.recipe.train.max_grad_norm)
        if not all(math.isfinite(v) for v in stats.values()) or not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        return stats

    def metrics(self, rollout: Rollout, steps: list[dict]) -> dict:
        """What an iteration reports: the rollout's rewards, KL and lengths, the share of its prompts given its most
        common answer (that answer's text in self.common_answer), and the mean of its steps' statistics."""
        mean = lambda key: sum(s[key] for s in steps) / len(steps) if steps else float("nan")
        mask, parts = rollout.mask, rollout.parts
        kl = rl.kl_estimates(rollout.logp_old, rollout.logp_ref, mask)
        per_prompt = self.cfg.samples_per_prompt  # collect's rows are prompt-major
        prompts_by_text: dict[str, set[int]] = {}
        for i, text in enumerate(rollout.texts):
            prompts_by_text.setdefault(text.strip(), set()).add(i // per_prompt)
        self.common_answer, given = max(prompts_by_text.items(), key=lambda item: len(item[1]))
        return {
            "reward": sum(rollout.raw) / len(rollout.raw),
            **{f"reward_{name}": sum(v) / len(v) for name, v in parts.items() if len(parts) > 1},
            "score": rollout.score.mean().item(),
            "kl": ((rollout.logp_old - rollout.logp_ref) * mask).sum(-1).mean().item(),  # per answer, k1 summed
            **{f"kl_{name}_per_token": v for name, v in kl.items()},
            **{key: mean(key) for key in STEP_STATISTICS},
            "explained_variance": rl.explained_variance(rollout.values, rollout.returns, mask),
            "answer_length": mask.sum(-1).float().mean().item(),
            "missing_eos_rate": 1 - sum(rollout.ended) / rollout.n,
            "same_answer_share": len(given) / math.ceil(rollout.n / per_prompt),
        }

    # ---- forward passes

    def _inputs(self, rollout: Rollout, rows: torch.Tensor) -> dict:
        attention = rollout.attention_mask[rows]
        return {"input_ids": rollout.input_ids[rows], "attention_mask": attention,
                "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "use_cache": False}

    def logprobs(self, rollout: Rollout, rows: torch.Tensor, with_entropy: bool = False):
        """log pi(answer token | everything before it), (len(rows), T) in fp32, from logits / temperature (and the
        entropy of that distribution, the same shape)."""
        width = rollout.input_ids.shape[1] - rollout.prompt_width
        logits = self.model(**self._inputs(rollout, rows), logits_to_keep=width + 1).logits[:, :-1]
        logp_all = torch.log_softmax(logits.float() / self.cfg.temperature, dim=-1)
        answer = rollout.input_ids[rows][:, rollout.prompt_width:]
        logp = logp_all.gather(-1, answer.unsqueeze(-1)).squeeze(-1)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def values(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """V(prompt + answer[:t]) for every answer token t, (len(rows), T): the value head on the state before it."""
        hidden = reward_model.transformer(self.model)(**self._inputs(rollout, rows)).last_hidden_state
        return self.value_head(hidden[:, rollout.prompt_width - 1:-1].float()).squeeze(-1)

    # ---- evaluation, saving, resuming

    def evaluate(self, prompt_rows: list[dict]) -> float:
        """The mean reward of greedy answers (before whitening)."""
        with models.use_adapter(self.model, "default"):
            answers = sampling.generate(self.model, self.tokenizer, [r["prompt"] for r in prompt_rows], greedy=True,
                                        max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.generation_batch_size)
        raw, _ = self.rewards([r["prompt"] for r in prompt_rows], [a[0].text for a in answers], [r["safety"] for r in prompt_rows])
        return sum(raw) / len(raw)

    def save_models(self, folder: Path) -> None:
        """The policy adapter at the top (the run's adapter), the value adapter and head in value/."""
        self.model.save_pretrained(str(folder), selected_adapters=["default", "value"])
        save_file({"weight": self.value_head.weight.detach().cpu().contiguous()}, str(folder / "value" / VALUE_HEAD_FILE))

    def save_checkpoint(self, out: Path, state: dict) -> Path:
        """checkpoint-N/: models, optimiser, scheduler, then trainer_state.json; published by one rename."""
        target = out / f"checkpoint-{state['iteration']}"
        tmp = runs.make_temp_dir(target)
        try:
            self.save_models(tmp)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
            runs.publish_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        runs.rotate_checkpoints(out, self.recipe.train.save_total_limit)
        return target

    def load(self, checkpoint: Path) -> dict:
        """The models, optimiser and scheduler of checkpoint-N/ loaded in place; returns its trainer_state.json."""
        for name, folder in (("default", checkpoint), ("value", checkpoint / "value")):
            set_peft_model_state_dict(self.model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name)
        with torch.no_grad():
            self.value_head.weight.copy_(load_file(str(checkpoint / "value" / VALUE_HEAD_FILE))["weight"])
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=self.model.device))
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
        return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- plumbing


def load_prompts(sources, tokenizer, data_cfg) -> tuple[list[dict], data.Report]:
    """The prompts, with those longer than data.max_length tokens dropped and counted."""
    prompts, report = data.load_prompts(sources, skip_invalid=data_cfg.skip_invalid)
    kept = [p for p in prompts if len(tokenizer.apply_chat_template(p["prompt"], tokenize=True, return_dict=True)["input_ids"])
            <= data_cfg.max_length]
    report.dropped_too_long = len(prompts) - len(kept)
    report.examples = len(kept)
    if not kept:
        raise UserError(f"every prompt is longer than data.max_length={data_cfg.max_length} tokens")
    if report.dropped_too_long:
        report.notes.append(f"{report.dropped_too_long} prompts longer than data.max_length={data_cfg.max_length} dropped")
    return kept, report


def iterations(recipe: Recipe, n_prompts: int) -> int:
    """train.max_steps iterations, or enough for train.epochs passes over the prompts."""
    return recipe.train.max_steps or max(1, math.ceil(recipe.train.epochs * n_prompts / recipe.ppo.batch_size))


def prompt_indices(iteration: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The prompts of an iteration: consecutive slices of a reshuffled pass over the data (seeded per pass)."""
    picked, orders = [], {}
    for position in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, offset = divmod(position, n)
        if epoch not in orders:  # one shuffle per pass over the data, not one per prompt
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        picked.append(orders[epoch][offset])
    return picked


def optimizer_class(recipe: Recipe):
    """The optimiser train.optim names, with the recipe's AdamW settings, through transformers' own mapping
    (`Trainer.get_optimizer_cls_and_kwargs` reads them from a TrainingArguments, built here only for that)."""
    args = TrainingArguments(**{k: v for k, v in common.trainer_arguments(recipe, Path("/nonexistent"), has_eval=False).items()
                                if k in ("output_dir", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
                                         "adam_epsilon", "optim", "use_cpu")}, report_to=[])
    return Trainer.get_optimizer_cls_and_kwargs(args)


def tensorboard(recipe: Recipe, out: Path):
    if recipe.train.report_to != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "runs" / "ppo"))
