"""How much training data a recipe has: rows and mean tokens per example, from a local file (the first rows counted
with the model's tokenizer when it is on disk, else estimated from characters), the `datasets` cache, or the
declared sizes of the Hub datasets the shipped recipes use. Never downloads."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ft import data, tiny
from ft.errors import UserError
from ft.hub_id import hub_cache_file
from ft.recipe import DataSource, Recipe


@dataclass
class DataSize:
    """The size of a recipe's training (or evaluation) data, and how it was found."""

    rows: int | None  # examples (dialogs, pairs or prompts)
    tokens: float | None  # mean tokens of one training sequence (a dialog; prompt + one answer for pairs)
    prompt_tokens: float | None = None  # mean prompt tokens (pairs, prompts)
    method: str = "unknown"  # how it was measured: tokenizer, bytes, declared, unknown
    source: str = ""

    def describe(self) -> str:
        if self.rows is None:
            return f"{self.source}: size unknown"
        text = f"{self.source}: {self.rows:,} rows"
        if self.tokens:
            text += f", ~{self.tokens:,.0f} tokens each"
        return text + f" ({self.method})"


# Declared sizes of the Hub datasets the shipped recipes use (their dataset cards) and typical lengths.
# UltraChat: 1,467 tokens per dialogue on average (Ding et al. 2023, "Enhancing Chat Language Models by Scaling
# High-quality Instructional Conversations", Table 1). HH-RLHF: ~250 tokens per transcript is our estimate from
# its mean transcript length (~1,000 characters at ~3.7 characters per token); the prompt is most of it.
HUB_DATASETS = {
    "huggingfaceh4/ultrachat_200k": {
        "rows": {"train_sft": 207_865, "test_sft": 23_110, "train_gen": 256_032, "test_gen": 28_304},
        "tokens": 1467, "prompt_tokens": 300,
        "source": "split sizes from the dataset card; 1,467 tokens per dialogue from the UltraChat paper"},
    "anthropic/hh-rlhf": {
        "rows": {"helpful-base/train": 43_835, "helpful-base/test": 2_354, "harmless-base/train": 42_537,
                 "harmless-base/test": 2_312, "train": 160_800, "test": 8_552},
        "tokens": 250, "prompt_tokens": 170,
        "source": "split sizes from the dataset card; ~250 tokens per transcript (our estimate)"},
}
CHARS_PER_TOKEN = 3.7  # English prose with Llama 2's SentencePiece tokenizer (an estimate, for counting by bytes)
TURN_OVERHEAD = 12  # <s>[INST] ... [/INST] ... </s> per turn, in tokens


def _split_rows(split: str, declared: dict, prefix: str = "") -> int | None:
    total = 0
    for part in split.split("+"):
        m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[\s*(-?\d*%?)\s*:\s*(-?\d*%?)\s*\])?\s*", part)
        if not m or (prefix + m.group(1)) not in declared:
            return None
        n = declared[prefix + m.group(1)]

        def at(text, default):
            if not text:
                return default
            value = n * int(text[:-1]) // 100 if text.endswith("%") else int(text)
            return max(0, min(n, value if value >= 0 else n + value))

        total += max(0, at(m.group(3), n) - at(m.group(2), 0))
    return total


def _datasets_cache_rows(path: str, split: str) -> int | None:
    """Declared split sizes of a Hub dataset already in the local `datasets` cache (dataset_info.json)."""
    from huggingface_hub import constants  # HF_HOME as the Hugging Face libraries resolve it

    # datasets' own rule (datasets/config.py), without importing datasets (it pulls in pyarrow)
    root = Path(os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets"))
    folder = root / path.replace("/", "___")
    if not folder.is_dir():
        return None
    for info in folder.glob("**/dataset_info.json"):
        try:
            splits = {k: v["num_examples"] for k, v in json.loads(info.read_text()).get("splits", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        rows = _split_rows(split, splits)
        if rows is not None:
            return rows
    return None


def data_size(sources: list[DataSource], *, kind: str, tokenizer_file: Path | None) -> DataSize:
    """Rows and mean tokens of the training data. kind: dialogs | pairs | prompts."""
    parts = [_source_size(src, kind, tokenizer_file) for src in sources]
    if any(p.rows is None for p in parts):
        unknown = [p for p in parts if p.rows is None]
        return DataSize(None, None, source=", ".join(p.source for p in unknown))
    rows = sum(p.rows for p in parts)
    known = [p for p in parts if p.tokens]
    mean = sum(p.tokens * p.rows for p in known) / max(sum(p.rows for p in known), 1) if known else None
    prompt = [p for p in parts if p.prompt_tokens]
    mean_prompt = sum(p.prompt_tokens * p.rows for p in prompt) / max(sum(p.rows for p in prompt), 1) if prompt else None
    methods = sorted({p.method for p in parts})
    return DataSize(rows, mean, mean_prompt, " + ".join(methods), " + ".join(p.source for p in parts))


def _source_size(src: DataSource, kind: str, tokenizer_file: Path | None) -> DataSize:
    path = Path(src.path).expanduser()
    if path.exists():
        return _local_size(path, src, kind, tokenizer_file)
    name = f"{src.path}[{src.split}]"
    declared = HUB_DATASETS.get(src.path.lower())
    rows = _datasets_cache_rows(src.path, src.split)
    if rows is None and declared:
        rows = _split_rows(src.split, declared["rows"], prefix=f"{src.data_dir}/" if src.data_dir else "")
    if rows is None:
        return DataSize(None, None, source=name)
    tokens = declared["tokens"] if declared else None
    return DataSize(rows, tokens, declared["prompt_tokens"] if declared else None,
                    "declared size" + (f"; {declared['source']}" if declared else ""), name)


SAMPLE_ROWS = 2000  # rows tokenized per local file (the rest extrapolated), to answer in well under two seconds


def _local_size(path: Path, src: DataSource, kind: str, tokenizer_file: Path | None) -> DataSize:
    if path.suffix.lower() not in (".jsonl", ".json"):  # parquet/csv: rows by bytes only
        return DataSize(None, None, source=f"{path} (only .jsonl/.json files are sized)")
    try:
        rows, total = _sample_rows(path, src)
    except UserError:
        return DataSize(None, None, source=str(path))
    texts, prompts, fmt = [], [], None
    for row in rows:
        try:
            if kind == "dialogs":
                fmt = fmt or (src.format if src.format != "auto" else data.detect_format(row))
                messages = data.to_messages(row, fmt)
                texts.append(([m["content"] for m in messages], len(messages)))
            elif kind == "pairs":
                pair = data.to_pair(row)
                prompt = [m["content"] for m in pair["prompt"]]
                texts.append((prompt + [pair["chosen"]], len(pair["prompt"]) + 1))
                texts.append((prompt + [pair["rejected"]], len(pair["prompt"]) + 1))
                prompts.append((prompt, len(prompt)))
            else:
                prompt = [m["content"] for m in data.to_prompt(row)["prompt"]]
                texts.append((prompt, len(prompt)))
                prompts.append((prompt, len(prompt)))
        except data.RowError:
            continue
    if not texts:
        return DataSize(total, None, source=str(path))
    count, method = _counter(tokenizer_file)
    mean = sum(count(parts, turns) for parts, turns in texts) / len(texts)
    mean_prompt = sum(count(parts, turns) for parts, turns in prompts) / len(prompts) if prompts else None
    if kind == "prompts":
        mean_prompt = mean
    sampled = f", {len(rows):,} of the rows sampled" if total > len(rows) else ""
    return DataSize(total, mean, mean_prompt, method + sampled, str(path))


def _sample_rows(path: Path, src: DataSource) -> tuple[list, int]:
    """The first SAMPLE_ROWS rows of a local JSON Lines or JSON file, and how many rows it has (JSON Lines are
    counted without parsing past the sample, so a large file is sized quickly)."""
    if path.suffix.lower() == ".jsonl" or data.looks_like_lines(path):
        rows, total = [], 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                total += 1
                if len(rows) < SAMPLE_ROWS:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
        return rows, total
    every, _ = data.read_rows(src)
    return [row for _, row in every[:SAMPLE_ROWS]], len(every)


def _counter(tokenizer_file: Path | None):
    """count(list of texts, turns) -> tokens, with the model's tokenizer if it is on disk, else from characters."""
    if tokenizer_file is not None:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tokenizer_file))
            overhead = len(tok.encode("[INST]  [/INST]", add_special_tokens=False).ids) + 2

            def count(parts, turns):
                return sum(len(e.ids) for e in tok.encode_batch(parts, add_special_tokens=False)) + overhead * math.ceil(turns / 2)

            return count, "counted with the model's tokenizer"
        except Exception:  # a tokenizer.json the installed `tokenizers` cannot read: fall back to characters
            pass

    def estimate(parts, turns):
        return sum(len(p) for p in parts) / CHARS_PER_TOKEN + TURN_OVERHEAD * math.ceil(turns / 2)

    return estimate, f"estimated from characters (~{CHARS_PER_TOKEN} per token)"


def tokenizer_file(recipe: Recipe) -> Path | None:
    """tokenizer.json of the recipe's model if it is on disk: a run folder, a local model, the tiny model, the Hub cache."""
    candidates = []
    if recipe.model.adapter:
        candidates.append(Path(recipe.model.adapter).expanduser() / "tokenizer.json")
    name = recipe.model.name
    if name == tiny.NAME:
        candidates.append(tiny.cache_dir() / f"tiny-llama-2-v{tiny.VERSION}" / "tokenizer.json")
    elif Path(name).expanduser().is_dir():
        candidates.append(Path(name).expanduser() / "tokenizer.json")
    elif name.count("/") == 1:
        cached = hub_cache_file(name, "tokenizer.json")
        if cached:
            candidates.append(cached)
    return next((c for c in candidates if c.is_file()), None)
