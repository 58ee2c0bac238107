"""Sampling answers and scoring them: shared by rejection sampling, PPO (and RLOO/GRPO) and Ghost Attention.

* `generate` samples (or greedily decodes) answers to chat prompts in batches, with left padding,
  and keeps each answer's token ids up to and including its `</s>` (and whether it reached one).
* Reward models are scored exactly as they were trained: the chat-formatted prompt + answer + `</s>`
  (`render`), read by the score head at that `</s>`. A reward model is either a standalone model
  (`Scorer`, what `llama-ft score` uses) or, when it was trained on the same base as the policy, its
  LoRA adapter and score head on the policy's own 4-bit base (`HeadScorer`): one copy of the weights.
* `Rewards` turns the recipe's reward source into one score per answer: the Llama 2 combination of a
  helpfulness and a safety reward model (`combine`), or a Python function with TRL's reward-function
  signature (`load_reward_function`).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ft import models, runs
from ft.errors import UserError


@dataclass
class Completion:
    prompt_ids: list[int]  # the chat-formatted prompt, unpadded
    ids: list[int]  # the answer's tokens, up to and including </s> when it ended
    text: str  # the answer, decoded without special tokens and stripped
    ended: bool  # the answer ended with </s> within max_new_tokens


def generate(model, tokenizer, prompts: list[list[dict]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 256, batch_size: int = 8, greedy: bool = False) -> list[list[Completion]]:
    """`n` answers to each prompt (lists of messages ending with the user turn), `batch_size` prompts at a time.

    The model is put in eval mode for generation (no dropout, no gradient checkpointing, KV cache on) and
    left in eval mode; callers that train switch back to train mode themselves.
    """
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    results = []
    for start in range(0, len(prompts), batch_size):
        encoded = [list(tokenizer.apply_chat_template(p, tokenize=True, return_dict=True)["input_ids"])
                   for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids, mask = _padded(encoded, pad, model.device, left=True)
        # top_k off: sampling follows softmax(logits / temperature) (within top_p), the distribution PPO scores
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, do_sample=not greedy, eos_token_id=eos, pad_token_id=pad,
                                 use_cache=True, **sampling)
        for i, ids in enumerate(encoded):
            answers = []
            for row in out[i * n:(i + 1) * n, width:].tolist():
                ended = eos in row
                row = row[:row.index(eos) + 1] if ended else row
                answers.append(Completion(ids, row, tokenizer.decode(row, skip_special_tokens=True).strip(), ended))
            results.append(answers)
    return results


def converse(model, tokenizer, dialogs: list[dict], **sampling) -> list[list[str]]:
    """Each dialog ({"system": text or None, "users": [user messages]}) answered turn after turn, the model's
    own answers as its history; `sampling` as for `generate` (n is 1). Returns the answers of every dialog."""
    answers: list[list[str]] = [[] for _ in dialogs]
    for turn in range(max((len(d["users"]) for d in dialogs), default=0)):
        active = [i for i, d in enumerate(dialogs) if len(d["users"]) > turn]
        prompts = [history(dialogs[i]["system"], dialogs[i]["users"][:turn + 1], answers[i]) for i in active]
        for i, out in zip(active, generate(model, tokenizer, prompts, **sampling)):
            answers[i].append(out[0].text)
    return answers


def history(system: str | None, users: list[str], answers: list[str]) -> list[dict]:
    """Messages: an optional system message, then user/assistant turns, ending with the user turn to answer."""
    messages = [{"role": "system", "content": system}] if system else []
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        if i < len(answers) and i < len(users) - 1:
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def render(tokenizer, prompt: list[dict], answer: str) -> list[int]:
    """The token ids a reward model reads: the chat-formatted prompt + answer + </s>."""
    messages = prompt + [{"role": "assistant", "content": answer}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def _padded(ids: list[list[int]], pad: int, device, left: bool = False):
    """input_ids and attention mask of a batch, padded on the right (scoring) or on the left (generation)."""
    width = max(len(x) for x in ids)
    rows = [([pad] * (width - len(x)) + x, [0] * (width - len(x)) + [1] * len(x)) if left
            else (x + [pad] * (width - len(x)), [1] * len(x) + [0] * (width - len(x))) for x in ids]
    return (torch.tensor([r[0] for r in rows], device=device), torch.tensor([r[1] for r in rows], device=device))


class Scorer:
    """A standalone reward model (base with a score head + the run's adapter): the score at the final </s>."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @classmethod
    def load(cls, run_dir: str | Path) -> "Scorer":
        from peft import PeftModel

        recipe = reward_recipe(run_dir)
        tokenizer = models.load_tokenizer(str(run_dir), trust_remote_code=recipe.model.trust_remote_code)
        base = models.load_model(recipe.model.model_copy(update={"adapter": None}), reward=True)
        models.exact_4bit_kernels(base)  # the same scores as on a shared base (see there)
        return cls(PeftModel.from_pretrained(base, str(run_dir)), tokenizer)

    def __call__(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            ids = [render(self.tokenizer, p, a) for p, a in zip(prompts[i:i + self.batch_size], answers[i:i + self.batch_size])]
            input_ids, mask = _padded(ids, self.tokenizer.pad_token_id, self.model.device)
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
            input_ids, mask = _padded(ids, self.tokenizer.pad_token_id, self.model.device)
            with torch.no_grad(), models.use_adapter(self.model, self.adapter):
                hidden = transformer(self.model)(input_ids=input_ids, attention_mask=mask).last_hidden_state
            last = mask.sum(-1) - 1  # right padding: the final </s>
            scores += (hidden[torch.arange(len(ids)), last].float() @ self.head.T)[:, 0].tolist()
        self.model.train(was_training)
        return scores


def transformer(peft_model):
    """The decoder stack (LlamaModel) under a PeftModel of a causal LM: hidden states without the LM head."""
    return peft_model.get_base_model().model


def reward_recipe(run_dir: str | Path):
    """The recipe of a finished reward-model run, or a UserError saying what the folder is instead."""
    recipe = runs.read_recipe(run_dir)
    if recipe.stage != "reward":
        raise UserError(f"{run_dir}: not a reward model run (its stage is {recipe.stage})")
    if not (Path(run_dir) / "adapter_config.json").is_file():
        raise UserError(f"{run_dir}: no adapter_config.json; the reward run did not finish")
    return recipe


def same_base(run_dir: str | Path, model_section) -> bool:
    """Whether a reward run was trained on this base with this quantization (so its adapter can share it)."""
    theirs = reward_recipe(run_dir).model
    return (_where(theirs.name), theirs.quantization) == (_where(model_section.name), model_section.quantization)


def _where(name: str) -> str:
    """A model name as one spelling: a local folder (or the built-in model) by its absolute path, else the Hub id."""
    path = Path(models.resolve(name)).expanduser()
    return str(path.resolve()) if path.exists() else name


# ---------------------------------------------------------------- rewards


def combine(helpful: list[float], safety: list[float] | None, flags: list[bool], threshold: float) -> list[float]:
    """Llama 2's Rc: the safety score if the prompt is flagged or sigmoid(safety) < threshold, else helpfulness."""
    if safety is None:
        return list(helpful)
    return [s if flag or 1 / (1 + math.exp(-s)) < threshold else h for h, s, flag in zip(helpful, safety, flags)]


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / std over the entries where mask is set (all by default); masked entries become 0."""
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    picked = values[mask]
    mean = picked.mean()
    var = ((picked - mean) ** 2).sum() / max(picked.numel() - 1, 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(mask, out, torch.zeros_like(out))


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
