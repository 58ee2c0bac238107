"""Reward models, and the reward of an answer: shared by the reward stage, `llama-ft score`, rejection sampling, PPO.

* Reward models are scored exactly as they were trained: the chat-formatted prompt + answer + `</s>`
  (`render`), read by the score head at that `</s>`. A reward model is either a standalone model
  (`Scorer`, what `llama-ft score` and the reward stage's accuracy use) or, when it was trained on the same
  base as the policy (`same_base`), its LoRA adapter and score head on the policy's own 4-bit base
  (`HeadScorer`): one copy of the weights.
* `Rewards` turns the recipe's reward source into one score per answer: the Llama 2 combination of a
  helpfulness and a safety reward model (`combine`), or a Python function with TRL's reward-function
  signature (`load_reward_function`). `shared_rewards` builds it for a policy on its base.
Nothing here samples: that is ft/sampling.py's.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

from ft import chat_format, models, runs
from ft.errors import UserError

# ---------------------------------------------------------------- reward models


def render(tokenizer, prompt: list[dict], answer: str) -> list[int]:
    """The token ids a reward model reads: the chat-formatted prompt + answer, up to the answer's end-of-turn token
    (</s> in Llama 2's format)."""
    return chat_format.dialog_ids(tokenizer, prompt + [{"role": "assistant", "content": answer}])


def right_padded(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention mask (both (B, width)) of token lists padded on the right, so that each row's last
    real token (its </s>, where the score is read) sits at column mask.sum(-1) - 1."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
    return input_ids, mask


class Scorer:
    """A standalone reward model (base with a score head + the run's adapter): the score at the final </s>."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @classmethod
    def load(cls, run_dir: str | Path) -> "Scorer":
        recipe = reward_recipe(run_dir)
        tokenizer = models.load_tokenizer(str(run_dir), trust_remote_code=recipe.model.trust_remote_code)
        base = models.load_model(recipe.model.model_copy(update={"adapter": None}), reward=True,
                                 pad_token_id=tokenizer.pad_token_id)
        models.exact_4bit_kernels(base)  # the same scores as on a shared base (see there)
        return cls(models.load_adapter(base, run_dir), tokenizer)

    def __call__(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            ids = [render(self.tokenizer, p, a) for p, a in zip(prompts[i:i + self.batch_size], answers[i:i + self.batch_size])]
            input_ids, mask = right_padded(ids, self.tokenizer.pad_token_id, self.model.device)
            with torch.no_grad():
                scores += self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores


class HeadScorer:
    """A reward model living on the policy's base: its LoRA adapter (switched to for the forward pass, frozen)
    and its score head, read at the final </s> exactly as the standalone model reads it."""

    def __init__(self, model, tokenizer, adapter: str, head: torch.Tensor, batch_size: int = 8):
        self.model, self.tokenizer, self.adapter, self.batch_size = model, tokenizer, adapter, batch_size
        self.head = head.detach().to(model.device, torch.float32)

    def __call__(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        scores = []
        was_training = self.model.training
        self.model.eval()
        for i in range(0, len(prompts), self.batch_size):
            ids = [render(self.tokenizer, p, a) for p, a in zip(prompts[i:i + self.batch_size], answers[i:i + self.batch_size])]
            input_ids, mask = right_padded(ids, self.tokenizer.pad_token_id, self.model.device)
            with torch.no_grad(), models.use_adapter(self.model, self.adapter):
                hidden = transformer(self.model)(input_ids=input_ids, attention_mask=mask).last_hidden_state
            last = mask.sum(-1) - 1  # right padding: the final </s>
            scores += (hidden[torch.arange(len(ids)), last].float() @ self.head.T)[:, 0].tolist()
        self.model.train(was_training)
        return scores


def transformer(peft_model):
    """The decoder stack (LlamaModel) under a PeftModel of a causal LM: hidden states without the LM head (what a
    score head reads; PPO's value head too)."""
    return peft_model.get_base_model().model


def reward_recipe(run_dir: str | Path):
    """The recipe of a finished reward-model run, or a UserError saying what the folder is instead."""
    recipe = runs.read_recipe(run_dir)
    if runs.is_chat_model(recipe):
        raise UserError(f"{run_dir}: not a reward model run (its stage is {recipe.stage})")
    if not runs.is_run(run_dir):
        raise UserError(f"{run_dir}: no {runs.ADAPTER_CONFIG}; the reward run did not finish")
    return recipe


def same_base(run_dir: str | Path, model_section) -> bool:
    """Whether a reward run was trained on this base with this quantization (so its adapter can share it)."""
    theirs = reward_recipe(run_dir).model
    return ((models.checkpoint_id(theirs.name), theirs.quantization)
            == (models.checkpoint_id(model_section.name), model_section.quantization))


# ---------------------------------------------------------------- rewards


def combine(helpful: list[float], safety: list[float] | None, flags: list[bool], threshold: float) -> list[float]:
    """Llama 2's Rc: the safety score if the prompt is flagged or sigmoid(safety) < threshold, else helpfulness."""
    if safety is None:
        return list(helpful)
    return [s if flag or 1 / (1 + math.exp(-s)) < threshold else h for h, s, flag in zip(helpful, safety, flags)]


def load_reward_function(spec: str):
    """`FILE.py:NAME` -> the function NAME defined in FILE.py (relative to the current directory)."""
    path_text, sep, name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not sep or not name or path.suffix != ".py":
        raise UserError(f"ppo.reward_function {spec!r}: expected FILE.py:NAME")
    if not path.is_file():
        raise UserError(f"ppo.reward_function: {path} not found (paths are relative to the current directory)")
    module_name = f"llama_ft_reward_{path.stem}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"ppo.reward_function: importing {path} failed ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"ppo.reward_function: {path} defines no function {name!r}")
    return function


def load_judge(spec: str) -> "Rewards":
    """A judge as the pipeline names one: `FILE.py:NAME` (a reward function) or a frozen reward-model run folder
    (loaded on its own). Its scores are probabilistic (Bradley-Terry) for a reward model, plain numbers otherwise."""
    if spec.rpartition(":")[0].endswith(".py"):
        return Rewards(function=load_reward_function(spec))
    return Rewards({"judge": Scorer.load(spec)})


class Rewards:
    """One score per answer from the recipe's reward source, with the parts it was combined from.

    Reward models: the first is helpfulness, `safety` the optional safety model; the score is Llama 2's
    combination (`combine`). A reward function: `fn(prompts=..., completions=..., **kwargs)` with prompts as
    message lists and completions as strings, as TRL's reward functions are called.
    """

    def __init__(self, scorers: dict[str, object] | None = None, function=None, *, threshold: float = 0.15):
        self.scorers, self.function, self.threshold = scorers or {}, function, threshold

    @property
    def names(self) -> list[str]:
        return list(self.scorers) if self.scorers else [getattr(self.function, "__name__", "reward_function")]

    def __call__(self, prompts: list[list[dict]], answers: list[str], flags: list[bool] | None = None,
                 **kwargs) -> tuple[list[float], dict[str, list[float]]]:
        flags = flags if flags is not None else [False] * len(prompts)
        if self.function is not None:
            values = self.function(prompts=prompts, completions=answers, **kwargs)
            values = list(values) if values is not None else []
            if len(values) != len(prompts) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise UserError(f"ppo.reward_function {self.names[0]} must return one finite number per completion "
                                f"({len(prompts)} expected, got {values[:4]!r}...)")
            values = [float(v) for v in values]
            return values, {self.names[0]: values}
        parts = {name: scorer(prompts, answers) for name, scorer in self.scorers.items()}
        names = list(parts)
        helpful, safety = parts[names[0]], parts.get("safety")
        return combine(helpful, safety, flags, self.threshold), parts


def shared_rewards(model, tokenizer, model_section, reward_runs: list[str], safety_run: str | None, *,
                   threshold: float, batch_size: int, log=print) -> tuple[Rewards, torch.Tensor | None, str | None]:
    """Reward models for a policy PeftModel: each run trained on the same base becomes a frozen adapter + score head
    on it; one trained on another base is loaded as a model of its own (and the log says so).

    Returns the Rewards, and the helpfulness model's score head and adapter name (the value model starts from them)
    when it shares the base."""
    scorers, first_head, first_adapter = {}, None, None
    named = [("helpfulness" if i == 0 else f"reward_{i}", run) for i, run in enumerate(reward_runs)]
    if safety_run:
        named.append(("safety", safety_run))
    for name, run in named:
        if same_base(run, model_section):
            adapter = f"rm_{name}"
            head = models.add_adapter(model, adapter, run_dir=str(run), trainable=False)
            if head is None:
                raise UserError(f"{run}: its adapter file has no score head; was it trained with `llama-ft reward`?")
            scorers[name] = HeadScorer(model, tokenizer, adapter, head, batch_size)
            if first_head is None and name == "helpfulness":
                first_head, first_adapter = head, adapter
            log(f"reward model {name}: {run} (adapter + score head on the shared base)")
        else:
            scorers[name] = Scorer.load(run)
            log(f"reward model {name}: {run} was trained on another base "
                f"({reward_recipe(run).model.name}); loaded as a separate model")
    return Rewards(scorers, threshold=threshold), first_head, first_adapter
