"""PPO as in Llama 2-Chat, on one 4-bit base; RLOO and GRPO (ppo.algorithm) go through TRL in ft/stages/ppo_trl.py.

One copy of the 4-bit base weights carries every model PPO needs, each a LoRA adapter:
  default      the policy, trained (it starts as the SFT run's adapter, model.adapter);
  reference    a frozen copy of that same adapter (with adapters merely disabled the reference would be
               the pre-SFT base); without model.adapter the policy starts as a new adapter, zero, so the reference
               is the base itself, its pass run with the adapters disabled (as DPO's; no copy to hold or compute);
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
Each pass over the rollout (old log-probs, reference, values, the policy's and the value model's updates) runs in
padded micro-batches of train.batch_size answers with its adapter switched on once; each phase is timed
(`PhaseTimer`, metrics.json's phase_seconds). With data.eval, every ppo.eval_every iterations the policy answers
the held-out prompts: the best held-out reward is the policy kept, and the run stops early as `early_stop` says
(`HeldOut`, Llama 2's early stopping), with `drift_warnings` for garble or repetition there.
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
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments, get_scheduler, set_seed
from trl.trainer.utils import disable_dropout_in_model

from ft import data, models, reward_model, rl, runs, sampling
from ft.errors import Interrupted
from ft.recipe import Recipe
from ft.rl import Rollout
from ft.stages import common
from ft.stages.policy import iterations, load_policy

VALUE_HEAD_FILE = "value_head.safetensors"
STEP_STATISTICS = ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "ratio", "entropy")  # per token, per step
KL_WARN_FACTOR = 3.0  # with ppo.kl_target: warn when the KL per answer passes this many times the target
KL_WARN_NATS = 10.0  # with a fixed beta: warn past this KL per answer (gameable rewards are hacked within a few nats)
COLLAPSE_SHARE = 0.5  # warn when one answer text is given to more than this share of an iteration's prompts (>= 3 of them)
KEPT_DIR = "kept"  # in the run folder while PPO runs: the policy with the best held-out reward so far
DRIFT_NATS = 1.0  # warn when the reference's log-prob per held-out answer token falls this far below its start
ENTROPY_FALL = 0.25  # warn when the policy's entropy per held-out answer token falls under this share of its start
PHASES = ("generate", "rewards", "old_logprobs", "reference_logprobs", "values", "advantages", "optimiser",
          "held_out")  # timed


class PhaseTimer:
    """Wall seconds per phase of the iterations (`PHASES`), summed over the run (this process's part of it, when
    resumed): `with timer("generate"): ...`. On a GPU it waits for the queued kernels at each phase boundary, so
    that each phase is charged its own work."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds[phase] += time.perf_counter() - started

    def report(self) -> dict:
        """{"phase_seconds": {phase: s}, "phase_share": {phase: share of their sum}} for metrics.json."""
        total = sum(self.seconds.values()) or 1.0
        return {"phase_seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "phase_share": {k: round(v / total, 4) for k, v in self.seconds.items()}}


def run(recipe: Recipe, *, resume: bool = False, log=print) -> dict:
    cfg, t = recipe.ppo, recipe.train
    function = reward_model.load_reward_function(cfg.reward_function) if cfg.reward_function else None  # fail early
    if cfg.algorithm != "ppo":
        from ft.stages import ppo_trl  # imported here: only rloo and grpo need TRL's trainers

        return ppo_trl.run(recipe, function, resume=resume, log=log)
    out, checkpoint = common.start(recipe, resume=resume, log=log)

    # 1. prompts (checked first), then one 4-bit base with the policy, reference, value and reward adapters
    ppo, prompts, report, eval_prompts = setup(recipe, function, log)
    total = iterations(recipe, len(prompts))

    # 2. the iterations, from a checkpoint if resuming
    state = ppo.load(Path(checkpoint)) if checkpoint else {"iteration": 0, "history": [], "skipped_steps": 0}
    state.setdefault("kl_coef", cfg.kl_coef)  # beta for the next iteration (a checkpoint of before ppo.kl_target: fixed)
    state.setdefault("warnings", [])
    state.setdefault("held_out", [])
    writer = tensorboard(recipe, out)
    eval_start = state.get("eval_start")
    if eval_prompts and checkpoint is None:
        eval_start = state["eval_start"] = ppo.evaluate(eval_prompts)
        log(f"eval prompts: mean reward of greedy answers {eval_start:.4f} before training")
    held_out = HeldOut(ppo, eval_prompts, out, total, seed=t.seed, log=log) if eval_prompts and cfg.eval_every else None
    if held_out is not None and not state["held_out"]:
        held_out(state)  # iteration 0: the SFT policy, the first candidate to keep
    with common.measured() as measured, common.interruptible() as stopper:
        after = AfterIteration(ppo, recipe, out, state, total, writer, stopper, log)
        fit(ppo, prompts, state, total, seed=t.seed, after_iteration=after, held_out=held_out)
    after.bar.close()
    if writer is not None:
        writer.close()

    # 3. the kept policy adapter (the run's adapter), the value model beside it, the tokenizer; metrics last
    kept = held_out.restore_kept(state) if held_out is not None else {
        "iteration": state["iteration"], "reason": "the last iteration (no held-out evaluation: data.eval or "
                                                  "ppo.eval_every unset)"}
    runs.save_final(out, lambda tmp: (ppo.save_models(tmp), ppo.tokenizer.save_pretrained(str(tmp))))
    shutil.rmtree(out / KEPT_DIR, ignore_errors=True)
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
        "held_out": state["held_out"],  # every held-out evaluation: iteration, reward, kl, entropy, ...
        "kept_iteration": kept["iteration"],  # the iteration whose policy is the run's adapter
        "kept_reason": kept["reason"],
        "stopped_early": state.get("stop_reason") is not None,
        "stop_reason": state.get("stop_reason"),
        "reward_sources": ppo.rewards.names,
        "value_init": ppo.value_init,
        "resumed_from": checkpoint,
        **measured,
        **ppo.timer.report(),
        "data": {"train": vars(report)},
    }
    if eval_prompts:
        metrics["eval"] = {"reward_start": eval_start, "reward_end": ppo.evaluate(eval_prompts), "prompts": len(eval_prompts)}
        log(f"eval prompts: mean reward of greedy answers {eval_start:.4f} -> {metrics['eval']['reward_end']:.4f} "
            f"(the policy of iteration {kept['iteration']}: {kept['reason']})")
    runs.write_json(out / runs.METRICS_FILE, metrics)
    if history:
        log(f"reward {metrics['reward_first']:.4f} -> {metrics['reward_last']:.4f} over {len(history)} iterations "
            f"(KL to the reference {metrics['kl_last']:.4f})")
    return metrics


def fit(ppo: PPO, prompts: list[dict], state: dict, total: int, *, seed: int, after_iteration, held_out=None) -> None:
    """Iterations state["iteration"] .. total - 1, each on its slice of the prompts (`prompt_indices`) and reseeded
    from seed + its number first, so that a resumed run samples the same rollouts; `state` (what a checkpoint
    saves) counts the iterations and skipped steps, keeps each iteration's metrics and beta for the next
    iteration (state["kl_coef"], adapted after each iteration when ppo.kl_target is set); `after_iteration(metrics)`
    is called after each (progress, logging, checkpoints: `run`'s). `held_out` (a HeldOut, or None) evaluates the
    policy on the held-out prompts when due and may stop the run (state["stop_reason"])."""
    cfg = ppo.cfg
    for iteration in range(state["iteration"], total):
        if state.get("stop_reason"):
            break
        set_seed(seed + iteration)
        stats = ppo.iteration([prompts[i] for i in prompt_indices(iteration, cfg.batch_size, len(prompts), seed)],
                              kl_coef=state["kl_coef"])
        state["skipped_steps"] += stats.pop("skipped_steps")
        state["history"].append({"iteration": iteration + 1, **stats})
        state["iteration"] = iteration + 1
        if cfg.kl_target is not None:  # the KL the controller holds: per answer, as stats["kl"] and metrics' kl_last
            state["kl_coef"] = rl.adaptive_kl_coef(state["kl_coef"], stats["kl"], cfg.kl_target,
                                                   cfg.batch_size * cfg.samples_per_prompt, cfg.kl_horizon)
        if held_out is not None and held_out.due(state["iteration"]):
            held_out(state)
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


class HeldOut:
    """Llama 2's early stopping on held-out prompts (data.eval), every ppo.eval_every iterations, before the first
    and after the last: `PPO.held_out_metrics` (one sampled answer per prompt: mean reward, KL to the reference,
    entropy, the reference's log-prob per answer token), appended to state["held_out"]. The policy kept is the one
    with the best held-out reward (`early_stop`), saved in KEPT_DIR/ of the run folder when it is found; the run stops
    as `early_stop` says (state["stop_reason"]). Drift (`drift_warnings`) is warned about once per run."""

    def __init__(self, ppo: PPO, prompts: list[dict], out: Path, total: int, *, seed: int, log):
        self.ppo, self.prompts, self.out, self.total, self.seed, self.log = ppo, prompts, out, total, seed, log
        self.every, self.patience = ppo.cfg.eval_every, ppo.cfg.eval_patience

    def due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.total

    def __call__(self, state: dict) -> None:
        done = state["iteration"]
        measured = {"iteration": done, **self.ppo.held_out_metrics(self.prompts, seed=self.seed * 7919 + done)}
        state["held_out"].append(measured)
        kept, stop = early_stop(state["held_out"], self.patience)
        self.log(f"held-out prompts at iteration {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in measured.items()
                                                                      if k != "iteration")
                 + f"; best so far: iteration {state['held_out'][kept]['iteration']}")
        if kept == len(state["held_out"]) - 1:  # a new best: kept on disk, so that a later stop can return to it
            target = self.out / KEPT_DIR
            tmp = runs.make_temp_dir(target)
            self.ppo.save_models(tmp)
            runs.write_json(tmp / "kept.json", {"iteration": done})
            shutil.rmtree(target, ignore_errors=True)
            runs.publish_dir(tmp, target)
        given = {w["kind"] for w in state["warnings"]}
        for kind, message in drift_warnings(state["held_out"], self.ppo.cfg):
            if kind not in given:
                state["warnings"].append({"kind": kind, "iteration": done, "message": message})
                self.log(f"warning: {message}")
        if stop and done < self.total:
            state["stop_reason"] = stop
            self.log(f"stopping early after iteration {done}: {stop}")

    def restore_kept(self, state: dict) -> dict:
        """Load the kept policy (and value model) into the PPO object if it is not the last iteration's; its iteration
        and why it was kept."""
        kept, _ = early_stop(state["held_out"], None)
        best = state["held_out"][kept]
        reason = (f"the best held-out reward, {best['reward']:.4f} (KL {best['kl']:.3f} nats), of "
                  f"{len(state['held_out'])} evaluations every {self.every} iterations")
        if best["iteration"] != state["iteration"]:
            saved = runs.read_json(self.out / KEPT_DIR / "kept.json")["iteration"]
            if saved != best["iteration"]:
                raise RuntimeError(f"{self.out / KEPT_DIR} holds iteration {saved}, not {best['iteration']}")
            self.ppo.load_models(self.out / KEPT_DIR)
            self.log(f"the run's adapter is the policy of iteration {best['iteration']} ({reason}), not the last")
        return {"iteration": best["iteration"], "reason": reason}


def early_stop(evaluations: list[dict], patience: int | None) -> tuple[int, str | None]:
    """The rule of the held-out evaluations ({"iteration", "reward", "kl", ...}, in order): (the index of the one to
    keep, why to stop now or None). Kept: the highest held-out reward (the earliest of equals; evaluation 0, the
    starting policy, counts). Stop when the best is `patience` evaluations old, or when the reward fell while the KL
    climbed at each of the last two evaluations; never with patience None."""
    kept = max(range(len(evaluations)), key=lambda i: (evaluations[i]["reward"], -i))
    if patience is None:
        return kept, None
    last = len(evaluations) - 1
    if last - kept >= patience:
        best = evaluations[kept]
        return kept, (f"the held-out reward has not beaten its best ({best['reward']:.4f}, iteration {best['iteration']}) "
                      f"for {last - kept} evaluations (ppo.eval_patience {patience})")
    falls = [j for j in (last - 1, last) if j >= 1 and evaluations[j]["reward"] < evaluations[j - 1]["reward"]
             and evaluations[j]["kl"] > evaluations[j - 1]["kl"]]
    if len(falls) == 2:
        a, b, c = (evaluations[j] for j in (last - 2, last - 1, last))
        return kept, (f"the held-out reward fell while the KL climbed at two evaluations in a row (reward {a['reward']:.4f} "
                      f"-> {b['reward']:.4f} -> {c['reward']:.4f}, KL {a['kl']:.3f} -> {b['kl']:.3f} -> {c['kl']:.3f} "
                      f"nats, iterations {a['iteration']}-{c['iteration']})")
    return kept, None


def drift_warnings(evaluations: list[dict], cfg) -> list[tuple[str, str]]:
    """(kind, message) for each sign, on the held-out prompts, that the policy has left its reference: "garble", the
    reference model's mean log-prob per answer token DRIFT_NATS below its start (answers the SFT model would not
    write, whatever they are, repeated or not); "repetition", the policy's entropy per token under ENTROPY_FALL x its
    start, or one answer given to more than COLLAPSE_SHARE of the prompts."""
    first, now = evaluations[0], evaluations[-1]
    out = []
    keys = (f"hold the policy nearer its reference: a smaller ppo.kl_target ({cfg.kl_target}), a larger ppo.kl_coef "
            f"({cfg.kl_coef:g}), a lower train.learning_rate; the run's adapter is the best held-out iteration's")
    fall = first["reference_logprob"] - now["reference_logprob"]
    if fall > DRIFT_NATS:
        out.append(("garble", f"iteration {now['iteration']}: on the held-out prompts the reference model gives the "
                              f"policy's answers {fall:.2f} nats per token less than at the start "
                              f"({first['reference_logprob']:.2f} -> {now['reference_logprob']:.2f}; KL {now['kl']:.2f} "
                              f"nats per answer, reward {first['reward']:.3f} -> {now['reward']:.3f}): the answers are "
                              f"drifting into text the SFT model would not write, which a gameable reward may still "
                              f"score well. Read some (`llama-ft chat RUN`); {keys}."))
    share = now["same_answer_share"]
    if now["entropy"] < ENTROPY_FALL * first["entropy"] or (share > COLLAPSE_SHARE and share * now["prompts"] >= 3):
        out.append(("repetition", f"iteration {now['iteration']}: on the held-out prompts the policy's entropy is "
                                  f"{now['entropy']:.3f} nats per token (at the start {first['entropy']:.3f}) and "
                                  f"{share:.0%} of the prompts got the same answer: the answers are collapsing onto "
                                  f"a few; {keys}."))
    return out


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
    eval_prompts = None
    if recipe.data.eval:
        eval_prompts, eval_report = data.load_prompts(recipe.data.eval, skip_invalid=recipe.data.skip_invalid,
                                                      tokenizer=tokenizer, max_length=recipe.data.max_length)
        log(eval_report.summary("eval prompts"))
    reference = None  # without model.adapter the policy starts at zero: the reference is the base, adapters off
    if recipe.model.adapter:
        reference = "reference"
        models.add_adapter(model, reference, copy_of="default")
    if rm_adapter is not None:
        models.add_adapter(model, "value", copy_of=rm_adapter, trainable=True)
    else:
        models.add_adapter(model, "value", lora=runs.trained_lora(recipe), trainable=True)
    value_head = torch.nn.Linear(model.config.hidden_size, 1, bias=False, device=model.device, dtype=torch.float32)
    with torch.no_grad():
        value_head.weight.copy_(rm_head if rm_head is not None else torch.zeros_like(value_head.weight))
    disable_dropout_in_model(model)  # PPO's ratios and values need deterministic forwards (LoRA's dropout too)
    ppo = PPO(model, value_head, tokenizer, rewards, recipe, iterations(recipe, len(prompts)), reference=reference)
    ppo.value_init = "helpfulness reward model" if rm_adapter else "new adapter, zero head"
    log(f"on one base: policy, reference ({'frozen copy of the SFT adapter' if reference else 'the base, adapters off'}), "
        f"value ({ppo.value_init}), reward: {', '.join(rewards.names)}")
    return ppo, prompts, report, eval_prompts


# ---------------------------------------------------------------- PPO on the shared base


class PPO:
    """The rollout and the update of one iteration, on a PeftModel with adapters default, value and `reference` (its
    name; None: the reference is the base, adapters disabled)."""

    def __init__(self, model, value_head, tokenizer, rewards: reward_model.Rewards, recipe: Recipe,
                 total_iterations: int, reference: str | None = "reference"):
        self.model, self.value_head, self.tokenizer, self.rewards = model, value_head, tokenizer, rewards
        self.reference = reference
        self.cfg, self.recipe = recipe.ppo, recipe
        self.common_answer = ""  # the last iteration's most common answer text, for the collapse warning
        self.timer = PhaseTimer()
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

    def collect(self, prompt_rows: list[dict], n: int | None = None) -> Rollout:
        """Sample `n` answers per prompt (ppo.samples_per_prompt), score them, and lay them out as [left-padded
        prompt | right-padded answer] rows."""
        cfg, tokenizer, timer = self.cfg, self.tokenizer, self.timer
        with timer("generate"), models.use_adapter(self.model, "default"):
            samples = sampling.generate(self.model, tokenizer, [r["prompt"] for r in prompt_rows],
                                        n=n or cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size)
        rows = [(row, c) for row, answers in zip(prompt_rows, samples) for c in answers]
        with timer("rewards"):
            raw, parts = self.rewards([r["prompt"] for r, _ in rows], [c.text for _, c in rows],
                                      [r["safety"] for r, _ in rows])
        ended = [c.ended for _, c in rows]
        score = torch.tensor(raw, dtype=torch.float32)
        if cfg.whiten_rewards and len(raw) > 1:
            score = rl.whiten(score)
        score = score - cfg.missing_eos_penalty * (~torch.tensor(ended)).float()
        pad = tokenizer.pad_token_id
        prompts = pad_sequence([torch.tensor(c.prompt_ids) for _, c in rows], batch_first=True, padding_value=pad,
                               padding_side="left")
        answers = pad_sequence([torch.tensor(c.ids or [pad], dtype=torch.long) for _, c in rows], batch_first=True,
                               padding_value=pad)
        lengths = torch.tensor([len(c.ids) for _, c in rows])
        prompt_lengths = torch.tensor([len(c.prompt_ids) for _, c in rows])
        prompt_mask = torch.arange(prompts.shape[1]) >= prompts.shape[1] - prompt_lengths.unsqueeze(1)
        answer_mask = torch.arange(answers.shape[1]) < lengths.unsqueeze(1)
        device = self.model.device
        attention = torch.cat([prompt_mask, answer_mask], 1).long()
        return Rollout(input_ids=torch.cat([prompts, answers], 1).to(device), attention_mask=attention.to(device),
                       prompt_width=prompts.shape[1], mask=answer_mask.to(device), raw=raw, parts=parts, ended=ended,
                       score=score.to(device), texts=[c.text for _, c in rows])

    def score(self, rollout: Rollout, first_order: torch.Tensor, kl_coef: float | None = None) -> None:
        """Old and reference log-probs, values, per-token rewards (KL coefficient `kl_coef`, ppo.kl_coef by default),
        advantages and returns of a rollout (set on it). Each is one pass over the rollout in the micro-batches of
        the first update (train.batch_size answers each, padded), with its adapter switched on once."""
        cfg, mask, timer = self.cfg, rollout.mask, self.timer
        with timer("old_logprobs"):
            rollout.logp_old, = self.no_grad_pass(rollout, "default", lambda rows: self.logprobs(rollout, rows)[0],
                                                  first_order)
        with timer("reference_logprobs"):
            rollout.logp_ref, = self.no_grad_pass(rollout, self.reference, lambda rows: self.logprobs(rollout, rows)[0],
                                                  first_order)
        with timer("values"):
            rollout.values, = self.no_grad_pass(rollout, "value", lambda rows: self.values(rollout, rows), first_order)
        with timer("advantages"):
            rollout.token_rewards = rl.per_token_rewards(rollout.score, rollout.logp_old, rollout.logp_ref, mask,
                                                         kl_coef=cfg.kl_coef if kl_coef is None else kl_coef)
            advantages, rollout.returns = rl.gae(rollout.token_rewards, rollout.values, mask, cfg.gamma, cfg.lam)
            rollout.advantages = rl.whiten(advantages, mask)

    def no_grad_pass(self, rollout: Rollout, adapter: str, forward, order: torch.Tensor) -> list[torch.Tensor]:
        """`forward(rows)` -> a (len(rows), T) tensor or a tuple of them, run over the whole rollout without
        gradients, with `adapter` switched on once, in micro-batches of train.batch_size answers taken in `order`, with
        the training forward (train mode, dropout off: the first update's micro-batches see ratio 1 exactly); each
        result (B, T), 0 outside the answers. `adapter` None: the base, every adapter disabled."""
        self.model.train()
        micro, results = self.recipe.train.batch_size, None
        switch = models.use_adapter(self.model, adapter) if adapter else self.model.disable_adapter()
        with torch.no_grad(), switch:
            for start in range(0, rollout.n, micro):
                rows = order[start:start + micro]
                got = forward(rows)
                got = got if isinstance(got, tuple) else (got,)
                if results is None:
                    results = [torch.zeros(rollout.mask.shape, device=rollout.mask.device) for _ in got]
                for result, part in zip(results, got):
                    result[rows] = part
        return [result * rollout.mask for result in results]

    def held_out_metrics(self, prompt_rows: list[dict], seed: int) -> dict:
        """One answer per held-out prompt, sampled as in training from seed `seed` (so the same after --resume; the
        training's random state is left as it was): the mean reward (raw), the KL to the reference per answer, the
        policy's entropy and the reference's log-prob per answer token, the share of prompts given the most common
        answer, the mean answer length; timed as the phase "held_out"."""
        timer, self.timer = self.timer, PhaseTimer()  # the passes inside are not charged to the iterations' phases
        try:
            with timer("held_out"), torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                torch.manual_seed(seed)
                rollout = self.collect(prompt_rows, n=1)
                order = torch.arange(rollout.n)
                logp, entropy = self.no_grad_pass(rollout, "default",
                                                  lambda rows: self.logprobs(rollout, rows, with_entropy=True), order)
                logp_ref, = self.no_grad_pass(rollout, self.reference, lambda rows: self.logprobs(rollout, rows)[0], order)
        finally:
            self.timer = timer
        mask = rollout.mask
        tokens = mask.sum().clamp(min=1)
        texts = [t.strip() for t in rollout.texts]
        return {"reward": sum(rollout.raw) / rollout.n, "kl": (logp - logp_ref).sum(-1).mean().item(),
                "entropy": (entropy.sum() / tokens).item(), "reference_logprob": (logp_ref.sum() / tokens).item(),
                "same_answer_share": max(texts.count(t) for t in set(texts)) / rollout.n,
                "answer_length": mask.sum(-1).float().mean().item(), "prompts": rollout.n}

    def step(self, rollout: Rollout, rows: torch.Tensor) -> dict | None:
        """One optimiser step on the answers `rows`, train.batch_size per forward pass (the policy's passes, then
        the value model's); None if skipped. Losses are summed over answer tokens and divided by the mini-batch's
        token count."""
        cfg, micro = self.cfg, self.recipe.train.batch_size
        parts = [rows[start:start + micro] for start in range(0, len(rows), micro)]
        tokens = rollout.mask[rows].sum().clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {key: torch.zeros((), device=tokens.device) for key in STEP_STATISTICS}
        with self.timer("optimiser"):
            with models.use_adapter(self.model, "default"):  # each backward before switching: see the module docstring
                for part in parts:
                    mask = rollout.mask[part]
                    logp, entropy = self.logprobs(rollout, part, with_entropy=True)
                    losses, ratio, clipped = rl.policy_loss(logp, rollout.logp_old[part], rollout.advantages[part],
                                                            cfg.clip_range)
                    ((losses * mask).sum() / tokens).backward()
                    log_ratio = logp.detach() - rollout.logp_old[part]
                    for key, per_token in (("policy_loss", losses.detach()), ("clip_fraction", clipped.float()),
                                           ("approx_kl", 0.5 * log_ratio ** 2), ("ratio", ratio), ("entropy", entropy)):
                        sums[key] += (per_token * mask).sum()
            with models.use_adapter(self.model, "value"):
                for part in parts:
                    mask = rollout.mask[part]
                    v_losses = rl.value_loss(self.values(rollout, part), rollout.values[part], rollout.returns[part],
                                             cfg.value_clip_range)
                    (cfg.vf_coef * (v_losses * mask).sum() / tokens).backward()
                    sums["value_loss"] += (v_losses.detach() * mask).sum()
            stats = {key: total.item() / tokens.item() for key, total in sums.items()}
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
        logits = self.model(**self._inputs(rollout, rows), logits_to_keep=width + 1).logits[:, :-1].float()
        if self.cfg.temperature != 1.0:  # a division by 1 would copy the (len(rows), T, vocabulary) logits for nothing
            logits = logits / self.cfg.temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        answer = rollout.input_ids[rows][:, rollout.prompt_width:]
        logp = logp_all.gather(-1, answer.unsqueeze(-1)).squeeze(-1)
        entropy = None
        if with_entropy:
            with torch.no_grad():  # -sum p log p over the vocabulary, as one batched dot product per token
                flat = logp_all.reshape(-1, 1, logp_all.shape[-1])
                entropy = -torch.bmm(flat.exp(), flat.transpose(1, 2)).reshape(logp.shape)
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

    def load_models(self, folder: Path) -> None:
        """The policy and value adapters and the value head of `save_models`' folder, loaded in place."""
        for name, sub in (("default", folder), ("value", folder / "value")):
            set_peft_model_state_dict(self.model, load_file(str(sub / "adapter_model.safetensors")), adapter_name=name)
        with torch.no_grad():
            self.value_head.weight.copy_(load_file(str(folder / "value" / VALUE_HEAD_FILE))["weight"])

    def load(self, checkpoint: Path) -> dict:
        """The models, optimiser and scheduler of checkpoint-N/ loaded in place; returns its trainer_state.json."""
        self.load_models(checkpoint)
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=self.model.device))
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
        return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- plumbing


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
