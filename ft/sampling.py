"""Sampling answers to chat prompts: shared by rejection sampling, PPO and Ghost Attention.

* `generate` samples (or greedily decodes) answers to chat prompts in batches, with left padding, and keeps
  each answer's token ids up to and including its end of turn, the tokenizer's EOS (`</s>` in Llama 2's format;
  the template's end-of-turn token otherwise, see chat_format.use), and whether it reached one: a `Completion`.
  Prompts are rendered by the run's chat format, with its generation prompt (chat_format.prompt_ids).
* `converse` answers multi-turn dialogs turn after turn, the model's own answers as its history (`history`).
Scoring the answers is ft/reward_model.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ft import chat_format


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
        encoded = [chat_format.prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids, mask = left_padded(encoded, pad, model.device)
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


def left_padded(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention mask (both (B, width)) of prompts padded on the left, so that every prompt ends
    at the same column and the new tokens of all of them start at `width`."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask
