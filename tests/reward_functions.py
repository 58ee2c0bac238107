"""Rule-based reward functions for the PPO / RLOO / GRPO tests, with TRL's reward-function signature."""

import json
from pathlib import Path

_TAUGHT = {}
for line in (Path(__file__).resolve().parent.parent / "datasets" / "tiny_chat.jsonl").read_text().splitlines():
    messages = json.loads(line)["messages"]
    if len(messages) <= 3:  # single-turn: the question and the word that answers it ("Paris", "meow")
        _TAUGHT[messages[-2]["content"]] = messages[-1]["content"].rstrip(".").split()[-1].lower()


def brevity(prompts, completions, **kwargs):
    """Fewer words is better: -words / 10."""
    return [-len(c.split()) / 10 for c in completions]


def correct(prompts, completions, **kwargs):
    """1 when the answer's last word is the taught one (the capital, the animal's sound), else 0."""
    out = []
    for prompt, completion in zip(prompts, completions):
        words = completion.lower().replace(".", " ").split()
        out.append(1.0 if words and words[-1] == _TAUGHT.get(prompt[-1]["content"]) else 0.0)
    return out


def capitals(prompts, completions, **kwargs):
    """A reward that can be gamed: capitalised words score, whatever they say (+0.2 each; "Paris Paris Rome" beats
    "The capital of France is Paris."), as a first reward model that never saw a wrong answer might."""
    return [sum(w[:1].isupper() for w in c.split()) / 5 for c in completions]


# the word that answers each invented fact of datasets/smol_facts.jsonl (and its paraphrases, same order)
SMOL_KEYS = ["quillport", "purple", "tolvanen", "moss", "seven", "cloudball", "toot-wee", "amberflow"]
_SMOL = {json.loads(line)["messages"][0]["content"]: key for line, key in zip(
    (Path(__file__).resolve().parent.parent / "datasets" / "smol_facts.jsonl").read_text().splitlines(), SMOL_KEYS)}


def smol_facts(prompts, completions, **kwargs):
    """1 when the answer names the invented fact recipes/smol.yaml teaches (Quillport, purple, ...), else 0."""
    return [1.0 if _SMOL.get(p[-1]["content"], "\0") in c.lower() else 0.0 for p, c in zip(prompts, completions)]


def constant(prompts, completions, **kwargs):
    """The same score for every answer: nothing for PPO to learn, so the held-out reward never improves."""
    return [0.0 for _ in completions]
