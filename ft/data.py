"""Training data: load files or Hub datasets, detect the row format, check every row, tokenize and mask.

Formats (named with `format:` or detected from the first row's fields):
  messages           {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
  sharegpt           {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
  alpaca             {"instruction": "...", "input": "... (optional)", "output": "..."}
  prompt_completion  {"prompt": "..." or [messages], "completion": "..." or [assistant message]}
All become chat dialogs, rendered by the run's chat format (ft/chat_format.py: Llama 2's, or the model's own
template; the tag checks on rows apply to Llama 2's only). A prompt_completion row trains its completion only: assistant turns inside
its prompt are context (Ghost Attention's rows: earlier turns are not trained). Every row is checked before any training starts; a bad row
stops the run naming its file and line/row, unless `data.skip_invalid: true`, in which case it
is skipped and counted. After tokenizing, a row whose answers are cut off entirely by
`data.max_length` is dropped and counted (it would train on nothing). Labels are -100 on every
token except the assistant answers and their end-of-turn token (EOS in Llama 2's format), taken from the
template's assistant mask, never from the pad id. A row the template cannot render stops the run naming its
file and row (or is skipped and counted with `data.skip_invalid`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ft import chat_format
from ft.errors import UserError, first_line
from ft.hub_id import is_hub_id
from ft.recipe import DataSource

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class RowError(chat_format.DialogError):
    """One row is invalid; the message says why (without the location, which the caller adds)."""


@dataclass
class Report:
    """What happened to the rows: printed by the stage and stored in the run's metrics."""

    rows: int = 0
    skipped_invalid: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    examples: int = 0
    packed_rows: int | None = None
    chat_format: str | None = None  # chat_format.describe: llama2, or the model's own template and its end of turn
    pad: str | None = None  # the pad token chosen (models.choose_pad) and its id
    notes: list[str] = field(default_factory=list)
    too_long: str = "answer entirely beyond max_length"  # what made a row too long, for the summary

    def note_tokenizer(self, tokenizer) -> None:
        """Record the chat format and the pad token the rows were (or will be) rendered with."""
        self.chat_format = chat_format.describe(tokenizer)
        self.pad = f"{tokenizer.pad_token} (id {tokenizer.pad_token_id})"

    def summary(self, name: str) -> str:
        parts = [f"{name}: {self.rows} rows read, {self.examples} examples kept"]
        if self.skipped_invalid:
            parts.append(f"{self.skipped_invalid} invalid rows skipped")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped ({self.too_long})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.packed_rows is not None:
            parts.append(f"packed into {self.packed_rows} sequences")
        if self.chat_format:
            parts.append(f"chat format {self.chat_format}, pad {self.pad}")
        return ", ".join(parts)


# ---------------------------------------------------------------- reading


def read_rows(source: DataSource) -> tuple[list[tuple[str, dict]], str]:
    """[(location, row)] and a display name; location is "line N" for JSON Lines, "row N" otherwise."""
    path = Path(source.path).expanduser()
    if path.exists():
        suffix = path.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
        if suffix == ".jsonl" or (suffix == ".json" and looks_like_lines(path)):
            return _read_json_lines(path), str(path)
        if suffix == ".json":
            return _read_json_array(path), str(path)
        extra = {"encoding": "utf-8-sig"} if suffix == ".csv" else {}  # a spreadsheet's byte-order mark is no column name
        return _read_with_datasets(LOCAL_SUFFIXES[suffix], str(path), source.split, data_files=str(path), **extra), str(path)
    if not is_hub_id(source.path):
        raise UserError(f"{source.path}: data file not found (paths are relative to the current directory)")
    extra = {"data_dir": source.data_dir} if source.data_dir else {}
    return _read_with_datasets(source.path, source.path, source.split, **extra), f"{source.path}[{source.split}]"


def looks_like_lines(path: Path) -> bool:
    for _, line in _text_lines(path):
        if line.strip():
            return not line.lstrip().startswith("[")
    return True


def _text_lines(path: Path):
    """(line number, text) of a UTF-8 file; a byte-order mark (as spreadsheet programs write) is skipped, and
    bytes that are not UTF-8 stop the run naming the line and the byte offset."""
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n}: not UTF-8 text (byte {offset + e.start} of the file: {e.reason}); "
                                "save the file as UTF-8") from None
            offset += len(raw)


def _read_json_lines(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for n, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    return rows


def _read_json_array(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads("".join(line for _, line in _text_lines(path)))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of rows (or JSON Lines)")
    return [(f"row {i}", row) for i, row in enumerate(data, start=1)]


def _read_with_datasets(builder: str, name: str, split: str, **kwargs) -> list[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, split=split, **kwargs)
    except Exception as e:  # datasets raises many types for missing/unreachable/malformed data
        raise UserError(f"{name}: cannot load dataset ({type(e).__name__}: {first_line(e, empty='')})") from None
    return [(f"row {i}", row) for i, row in enumerate(ds, start=1)]


# ---------------------------------------------------------------- formats


def detect_format(row: dict) -> str:
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise RowError(
        f"cannot tell the format from the fields {sorted(row)}: expected messages, conversations (sharegpt), "
        "instruction/output (alpaca) or prompt/completion"
    )


def to_messages(row: dict, fmt: str, *, tags: bool = True) -> list[dict]:
    """The row as a chat dialog ending with an assistant answer; RowError if it is not valid (with `tags`, the Llama 2
    format's: no message may contain its tags)."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    if fmt == "messages":
        messages = _field(row, "messages", list)
        messages = [
            {"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages
        ]
    elif fmt == "sharegpt":
        messages = []
        for i, m in enumerate(_field(row, "conversations", list), start=1):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise RowError(f"conversations[{i}]: expected an object with 'from' and 'value'")
            if m["from"] not in SHAREGPT_ROLES:
                raise RowError(f"conversations[{i}]: unknown speaker {m['from']!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    elif fmt == "alpaca":
        instruction = _field(row, "instruction", str)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise RowError(f"field 'input' must be text, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _field(row, "output", str)}]
    elif fmt == "prompt_completion":
        prompt, completion = _field(row, "prompt", (str, list)), _field(row, "completion", (str, list))
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        messages = list(prompt) + list(completion)
    else:
        raise RowError(f"unknown format {fmt!r}")
    problem = chat_format.check_messages(messages, tags=tags)
    if problem:
        raise RowError(problem)
    return messages


def _field(row: dict, name: str, kind):
    if name not in row or row[name] is None:
        raise RowError(f"missing field {name!r}")
    if not isinstance(row[name], kind):
        raise RowError(f"field {name!r} has the wrong type ({type(row[name]).__name__})")
    return row[name]


SKIP_HINT = "fix the row, or set data.skip_invalid: true to skip such rows"


def check_rows(sources: list[DataSource], convert, *, skip_invalid: bool, what: str = "rows",
               hint: str = SKIP_HINT) -> tuple[list[dict], Report]:
    """convert(row, source) for every row of every source, plus its origin ("file line N").

    A row that raises RowError stops the run with its file and line, or, with skip_invalid, is skipped
    and counted (the first few reasons kept for the report).
    """
    items, report = [], Report()
    for source in sources:
        rows, name = read_rows(source)
        if not rows:
            raise UserError(f"{name}: no rows")
        for location, row in rows:
            report.rows += 1
            try:
                items.append({**convert(row, source), "origin": f"{name} {location}"})
            except chat_format.DialogError as e:  # a RowError, or a dialog the chat template cannot render
                if not skip_invalid:
                    raise UserError(f"{name} {location}: {e} ({hint})") from None
                report.skipped_invalid += 1
                if len(report.notes) < 5:
                    report.notes.append(f"skipped {name} {location}: {e}")
    if not items:
        raise UserError(f"no valid {what} in " + ", ".join(s.path for s in sources))
    report.examples = len(items)
    return items, report


def load_dialogs(sources: list[DataSource], *, skip_invalid: bool, tokenizer=None) -> tuple[list[dict], Report]:
    """Every row of every source as {"messages", "origin"}; the format is named or detected per source. With a
    tokenizer, each dialog is also rendered by its chat format ("encoded": ids and assistant mask), so that a row the
    template cannot render is named (or skipped) like any invalid row."""
    formats: dict[int, str] = {}
    tags = tokenizer is None or chat_format.is_llama2(tokenizer)

    def convert(row, source):
        if id(source) not in formats:
            formats[id(source)] = source.format if source.format != "auto" else detect_format(row)
        item = {"messages": to_messages(row, formats[id(source)], tags=tags)}
        if formats[id(source)] == "prompt_completion" and isinstance(row.get("prompt"), list):
            # a prompt is context: its assistant turns (earlier answers) are not trained, only the completion
            item["context_answers"] = sum(m.get("role") == "assistant" for m in row["prompt"])
        if tokenizer is not None:
            item["encoded"] = chat_format.encode(tokenizer, item["messages"])
        return item

    return check_rows(sources, convert, skip_invalid=skip_invalid)


# ---------------------------------------------------------------- tokens


def tokenize(dialogs: list[dict], tokenizer, max_length: int, report: Report) -> list[dict]:
    """input_ids and labels (-100 outside assistant answers) for each dialog, truncated to max_length."""
    examples = []
    for dialog in dialogs:
        if "encoded" in dialog:
            input_ids, mask = dialog["encoded"]
        else:
            try:
                input_ids, mask = chat_format.encode(tokenizer, dialog["messages"])
            except chat_format.DialogError as e:
                raise UserError(f"{dialog['origin']}: {e}") from None
        if dialog.get("context_answers"):
            mask = _untrain_first_answers(mask, dialog["context_answers"])
        labels = [tok if keep else -100 for tok, keep in zip(input_ids, mask)]
        if len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if all(label == -100 for label in labels):
                report.dropped_too_long += 1
                if len(report.notes) < 10:
                    report.notes.append(f"dropped {dialog['origin']}: its answer starts after max_length={max_length}")
                continue
            report.truncated += 1
        examples.append({"input_ids": input_ids, "labels": labels})
    report.examples = len(examples)
    if not examples:
        raise UserError(f"every example was dropped: no answer fits in data.max_length={max_length}")
    return examples


def _untrain_first_answers(mask: list[int], count: int) -> list[int]:
    """The assistant mask with its first `count` answers (runs of 1s, one per answer) cleared."""
    out, runs, previous = list(mask), 0, 0
    for i, keep in enumerate(mask):
        if keep and not previous:
            runs += 1
        if keep and runs <= count:
            out[i] = 0
        previous = keep
    return out


def load_sft(sources: list[DataSource], tokenizer, *, max_length: int, skip_invalid: bool, packing: bool):
    """A datasets.Dataset of input_ids/labels ready for TRL's SFTTrainer (packed if asked), and the report."""
    import datasets

    dialogs, report = load_dialogs(sources, skip_invalid=skip_invalid, tokenizer=tokenizer)
    report.note_tokenizer(tokenizer)
    examples = datasets.Dataset.from_list(tokenize(dialogs, tokenizer, max_length, report))
    for dialog in dialogs:
        dialog.pop("encoded", None)
    if packing:
        from trl.data_utils import pack_dataset

        # best-fit decreasing: whole examples into rows of at most max_length, with their lengths in seq_lengths
        examples = pack_dataset(examples, max_length, strategy="bfd")
        report.packed_rows = len(examples)
    return examples, report, dialogs


class PackedCollator:
    """Batches packed rows as [batch, longest row], keeping each pack in its own row.

    Position ids restart at 0 for every example in a row and no attention mask is passed, so
    transformers builds a block-diagonal causal mask per row: examples never attend to each other.
    (TRL's padding-free collator instead flattens the whole batch into one row; with SDPA, which has
    no variable-length kernel, that makes attention cost grow with the square of the batch.)
    The padding after a short row is a block of its own, with labels -100; how many padding tokens the batch holds
    is passed as `padding_tokens` (the SFT stage counts them and removes the key before the forward pass): the pad id
    may also be a real token of the data, so padding is never found by comparing ids.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            position_ids[i, :n] = torch.cat([torch.arange(k) for k in row["seq_lengths"]])
            position_ids[i, n:] = torch.arange(width - n)
        padding = sum(width - len(row["input_ids"]) for row in rows)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "padding_tokens": torch.tensor(padding)}


# ---------------------------------------------------------------- preference pairs (reward, DPO, rejection)

STRENGTHS = ("significantly_better", "better", "slightly_better", "negligibly_better")
MARGINS = {"small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0)}  # Llama 2, Table 28


def to_pair(row: dict) -> dict:
    """A preference row as {prompt: messages ending with user, chosen: text, rejected: text, strength, margin}.

    Accepted: prompt (text or messages) with chosen/rejected (text or assistant messages); or, without a
    prompt, chosen/rejected full dialogs sharing a prefix (lists of messages, or Anthropic HH text with
    "\\n\\nHuman:" / "\\n\\nAssistant:" turns).
    """
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            raise RowError(f"missing field {name!r}")
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        chosen, rejected = _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")
    else:
        full_chosen, full_rejected = _dialog(row["chosen"]), _dialog(row["rejected"])
        if full_chosen[:-1] != full_rejected[:-1]:
            raise RowError("chosen and rejected dialogs must share everything but the last answer")
        prompt = full_chosen[:-1]
        chosen, rejected = _answer(full_chosen[-1:], "chosen"), _answer(full_rejected[-1:], "rejected")
    if not isinstance(prompt, list):
        raise RowError("field 'prompt' must be text or a list of messages")
    problem = chat_format.check_messages(prompt, final_user=True) or chat_format.check_messages(
        prompt + [{"role": "assistant", "content": chosen}]) or chat_format.check_messages(
        prompt + [{"role": "assistant", "content": rejected}])
    if problem:
        raise RowError(problem)
    if chosen.strip() == rejected.strip():
        raise RowError("chosen and rejected answers are identical")
    strength = row.get("strength")
    if strength is not None and strength not in STRENGTHS:
        raise RowError(f"unknown strength {strength!r} (expected one of {', '.join(STRENGTHS)})")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise RowError(f"field 'margin' must be a number, got {margin!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "strength": strength,
            "margin": None if margin is None else float(margin), "safety": bool(row.get("safety", False))}


def _answer(value, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        return value[0].get("content") if isinstance(value[0].get("content"), str) else ""
    raise RowError(f"field {name!r} must be text or one assistant message")


def _dialog(value) -> list[dict]:
    if isinstance(value, list):
        return value
    if isinstance(value, str) and "\n\nHuman:" in value:
        messages = []
        for chunk in value.split("\n\nHuman:")[1:]:
            user, sep, answer = chunk.partition("\n\nAssistant:")
            messages.append({"role": "user", "content": user.strip()})
            if sep:
                messages.append({"role": "assistant", "content": answer.strip()})
        return messages
    raise RowError("without a 'prompt', chosen and rejected must be full dialogs (messages, or HH text)")


def load_pairs(sources: list[DataSource], *, skip_invalid: bool) -> tuple[list[dict], Report]:
    """Every preference row, checked (see to_pair)."""
    return check_rows(sources, lambda row, source: to_pair(row), skip_invalid=skip_invalid, what="pairs")


def pair_margin(pair: dict, mode: str) -> float:
    """The ranking-loss margin of a pair under reward.margin (none, small, large, row)."""
    if mode == "none":
        return 0.0
    if mode == "row":
        return pair["margin"] or 0.0
    return MARGINS[mode][STRENGTHS.index(pair["strength"])] if pair["strength"] else 0.0


def load_prompts(sources: list[DataSource], *, skip_invalid: bool, tokenizer=None,
                 max_length: int | None = None) -> tuple[list[dict], Report]:
    """Prompts to answer: rows with a `prompt` (text or messages), `messages`, or a preference row's `chosen`
    dialog (Anthropic HH text or messages; a final answer is dropped), and an optional `safety: true` flag (the
    prompt is known to be adversarial). With a tokenizer and `max_length`, a prompt longer than max_length tokens
    once chat-formatted is dropped and counted (`report.dropped_too_long`, in the summary); none left is a UserError.
    PPO, RLOO, GRPO and rejection sampling read their prompts here."""
    prompts, report = check_rows(sources, lambda row, source: to_prompt(row), skip_invalid=skip_invalid, what="prompts")
    if tokenizer is None or max_length is None:
        return prompts, report
    kept = [p for p in prompts
            if len(tokenizer.apply_chat_template(p["prompt"], tokenize=True, return_dict=True)["input_ids"]) <= max_length]
    report.dropped_too_long, report.examples = len(prompts) - len(kept), len(kept)
    report.too_long = f"prompt longer than data.max_length={max_length} tokens"
    if not kept:
        names = ", ".join(s.path for s in sources)
        raise UserError(f"{names}: every prompt is longer than data.max_length={max_length} tokens")
    return kept, report


def to_prompt(row: dict) -> dict:
    if isinstance(row, dict) and "prompt" not in row and "messages" not in row and row.get("chosen") is not None:
        messages = _dialog(row["chosen"])  # a preference row (e.g. Anthropic HH): the dialog before the last answer
    elif not isinstance(row, dict) or ("prompt" not in row and "messages" not in row):
        raise RowError("expected a 'prompt' (text or messages), 'messages', or a preference row's 'chosen' dialog")
    else:
        messages = row["prompt"] if "prompt" in row else row["messages"]
    messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    problem = chat_format.check_messages(messages, final_user=True)
    if problem:
        raise RowError(problem)
    return {"prompt": messages, "safety": bool(row.get("safety", False))}


def to_score_row(row: dict) -> dict:
    """A row for `llama-ft score`: {prompt: text or messages, response: text}, kept as given, plus its prompt dialog."""
    if not isinstance(row, dict) or "prompt" not in row or not isinstance(row.get("response"), str):
        raise RowError('expected {"prompt": text or messages, "response": text}')
    return {"row": row, "prompt": to_prompt({"prompt": row["prompt"]})["prompt"]}
