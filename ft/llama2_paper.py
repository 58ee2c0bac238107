"""The Llama 2 paper's benchmark figures for the pretrained models, printed beside a user's lm-eval result.

Source: Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models", arXiv:2307.09288 (2023).
Each figure is a percentage as published, keyed by the lm-eval task it is comparable to and the lm-eval metric
it is printed beside. Only figures checked against a second source are here: PIQA, ARC-e and ARC-c (Table 20)
are left out until they are. Meta ran its own evaluation code (its own prompts and answer normalisation), so
lm-eval's figure for the same model differs by a few points; CAVEAT says so wherever a figure is printed.

Never add the paper's TruthfulQA (% of generations judged true and informative by fine-tuned GPT-3) or ToxiGen
(% toxic generations by a RoBERTa classifier): lm-eval's `truthfulqa_mc2` (multiple choice) and `toxigen`
(hate-speech classification accuracy) measure other things under the same names.
"""

from __future__ import annotations

import re

CITATION = "Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models (arXiv:2307.09288)"
CAVEAT = ("paper figures: the Llama 2 pretrained models as published; Meta used its own evaluation code, so a "
          "harness's figure for the same model differs by a few points")

# task: (lm-eval metric, shots in the paper, where in the paper, {size: figure})
FIGURES: dict[str, tuple[str, int, str, dict[str, float]]] = {
    "mmlu": ("acc", 5, "Table 3", {"7B": 45.3, "13B": 54.8, "70B": 68.9}),
    "boolq": ("acc", 0, "Table 20", {"7B": 77.4, "13B": 81.7, "70B": 85.0}),
    "hellaswag": ("acc_norm", 0, "Table 20", {"7B": 77.2, "13B": 80.7, "70B": 85.3}),
    "winogrande": ("acc", 0, "Table 20", {"7B": 69.2, "13B": 72.8, "70B": 80.2}),
    "gsm8k": ("exact_match", 8, "math results (GSM8K, maj@1)", {"7B": 14.6, "13B": 28.7, "70B": 56.8}),
    "humaneval": ("pass@1", 0, "Table 21", {"7B": 12.8, "13B": 18.3, "70B": 29.9}),
}

_SIZE = re.compile(r"llama-?2-(7|13|70)b", re.IGNORECASE)


def size_of(base: str | None) -> str | None:
    """"7B", "13B" or "70B" when `base` names a Llama 2 checkpoint (base or chat, Hub id or folder), else None."""
    found = _SIZE.search(base or "")
    return f"{found.group(1)}B" if found else None


def figure(task: str, metric: str, size: str | None) -> dict | None:
    """The paper's figure for lm-eval's `task` / `metric` (e.g. "acc,none") on a Llama 2 of `size`, or None."""
    if size is None or task not in FIGURES:
        return None
    paper_metric, shots, where, values = FIGURES[task]
    if metric.split(",")[0] != paper_metric or size not in values:
        return None
    return {"value": round(values[size] / 100, 4), "shots": shots, "source": where, "size": size}
