"""The maths of PPO on sampled answers, as plain torch functions, and the rollout they work on.

No model, tokenizer or recipe here: tensors in, tensors out, each function's shapes in its docstring. The names:
  B   answers in the rollout (prompts x samples per prompt), or the rows of a (mini-)batch of them;
  T   answer tokens: the width of the widest answer, shorter ones padded on the right;
  P   prompt tokens: the width of the widest prompt, shorter ones padded on the left.
A `mask` (B, T) is 1 (True) on an answer's tokens, up to and including its </s>, and 0 after it: what sits under
a 0 is ignored, and the rewards, advantages and returns are 0 there (the per-token losses are not masked: the loop
masks them as it sums them). The KL coefficient is an argument (`per_token_rewards(...,
kl_coef=...)`); `adaptive_kl_coef` is the controller that adapts it between iterations (Ziegler et al. 2019), so
the loop only changes the value it passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """One iteration's answers, laid out as [left-padded prompt | right-padded answer] rows (B = answers).

    `PPO.collect` fills the fields down to `score`; `PPO.score` fills the rest (None until then). The
    tensors are on the model's device; log-probabilities, values and rewards are float32.
    """

    input_ids: torch.Tensor  # (B, P + T) long: prompt tokens, then answer tokens; pad_token_id around them
    attention_mask: torch.Tensor  # (B, P + T) long: 1 on the prompt's and the answer's tokens, 0 on padding
    prompt_width: int  # P: answer tokens start at column P
    mask: torch.Tensor  # (B, T) bool: the answer's tokens, up to and including its </s>
    raw: list[float]  # (B) the reward source's score, before whitening and the missing-</s> penalty
    parts: dict[str, list[float]]  # reward model name -> (B) its scores (one entry for a reward function)
    ended: list[bool]  # (B) whether the answer ended with </s> within ppo.max_new_tokens
    score: torch.Tensor  # (B,) float32: raw, whitened over the rollout (ppo.whiten_rewards), minus the penalty
    texts: list[str] | None = None  # (B) the answers' text
    logp_old: torch.Tensor | None = None  # (B, T) float32: log pi(token) under the policy that sampled it
    logp_ref: torch.Tensor | None = None  # (B, T) float32: log pi_ref(token) under the frozen reference
    values: torch.Tensor | None = None  # (B, T) float32: V(prompt + answer[:t]), before the update
    token_rewards: torch.Tensor | None = None  # (B, T) float32: per_token_rewards
    advantages: torch.Tensor | None = None  # (B, T) float32: GAE advantages, whitened over the answer tokens
    returns: torch.Tensor | None = None  # (B, T) float32: advantages + values (before whitening): the value target

    @property
    def n(self) -> int:
        """B, the number of answers."""
        return self.input_ids.shape[0]


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """values: any shape, mask: the same shape (all set by default) -> (values - mean) / std over the masked
    entries (std with Bessel's correction), the same shape; entries outside the mask become 0."""
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    picked = values[mask]
    mean = picked.mean()
    var = ((picked - mean) ** 2).sum() / max(picked.numel() - 1, 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(mask, out, torch.zeros_like(out))


def per_token_rewards(score: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """score: (B,), logp, logp_ref, mask: (B, T) -> (B, T): the KL penalty -kl_coef * (log pi - log pi_ref) on
    every answer token, plus the answer's score on its last token (its </s>, or where max_new_tokens cut it off)."""
    rewards = -kl_coef * (logp - logp_ref)
    last = mask.sum(-1) - 1
    rewards[torch.arange(rewards.shape[0]), last.clamp(min=0)] += score
    return rewards * mask


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, answers: int, horizon: float) -> float:
    """The KL coefficient beta for the next iteration, from this iteration's `kl` (per answer, in nats) and `answers`:
    Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", section 2.2; openai/lm-human-preferences'
    and TRL's former `AdaptiveKLController`):

        error = clip(kl / target - 1, -0.2, 0.2);   beta <- beta * (1 + error * answers / horizon)

    A proportional controller: beta rises while the KL is above `target` and falls while below, by at most
    1 + 0.2 * answers / horizon per iteration, so it can move by a factor e at most every 5 * horizon answers.
    Plain float arithmetic (no torch), so a resumed run computes the very same beta."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * answers / horizon)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """rewards, values, mask: (B, T) -> (advantages, returns = advantages + values), both (B, T).

    Generalised advantage estimation over answer tokens; the value after the last token (</s>) is 0 and
    masked positions (past it) get 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip: float):
    """logp, logp_old, advantages: (B, T) -> (loss, ratio, clipped), each (B, T), per token (not masked).

    PPO's clipped surrogate max(-A r, -A clip(r, 1 - clip, 1 + clip)) with r = pi / pi_old; also r and
    whether the clipped term was the one taken (bool), both detached."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), ratio.detach(), (clipped > unclipped).detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """values, old_values, returns: (B, T) -> (B, T) per token (not masked):
    0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clamp(V - V_old, -clip, clip)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def kl_estimates(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """logp, logp_ref, mask: (B, T) -> {"k1", "k2", "k3"}: the three usual per-token estimators of
    KL(pi || pi_ref) on sampled tokens, averaged over the answer tokens:
    k1 = log r, k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with r = pi / pi_ref and r' = 1 / r."""
    log_r = (logp - logp_ref) * mask
    n = mask.sum().clamp(min=1)
    return {"k1": (log_r.sum() / n).item(), "k2": ((0.5 * log_r ** 2).sum() / n).item(),
            "k3": (((torch.exp(-log_r) - 1) + log_r) * mask).sum().item() / n.item()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """values, returns, mask: (B, T) -> 1 - Var(returns - values) / Var(returns) over the answer tokens
    (1: the value model predicts the returns; 0 or below: no better than their mean); nan if Var(returns) is 0."""
    m = mask.bool()
    var = returns[m].var()
    return (1 - (returns[m] - values[m]).var() / var).item() if var > 0 else float("nan")
