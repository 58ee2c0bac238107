"""`llama-ft annotate`: collect preference rows as Llama 2's annotators did, one comparison at a time.

The annotator writes a prompt; two answers come back labelled A and B, from two model variants (MODEL and
--against, or MODEL at two temperatures). Which variant is shown on which side is drawn per comparison and
recorded, so position carries no bias. The annotator picks the better one, how much better (the four Llama 2
strengths) and a safety label; the chosen answer carries the dialog into the next turn.

Each choice becomes one preference row, exactly what `llama-ft reward` and `llama-ft dpo` read:
  prompt    the dialog so far as messages (system included), ending with the user message
  chosen, rejected, strength (significantly_better | better | slightly_better | negligibly_better)
  safety_label  chosen_safe (the preferred answer is safe, the other not) | both_safe | both_unsafe
                (not `safety`: that key already means "an adversarial prompt" to ppo and rejection)
  chosen_model, chosen_temperature, rejected_model, rejected_temperature, chosen_side (A or B),
  sides {A: {model, temperature}, B: {...}}, time (UTC, ISO 8601)
Nothing is lost: a row is one complete line appended with flush + fsync before the page moves on; the file is
never truncated; writes from several tabs go one at a time.
"""

from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ft import chat_format, data
from ft.chat import Session
from ft.errors import UserError

# the visible labels, as Llama 2's annotators saw them, and the row values `llama-ft reward` reads
STRENGTH_LABELS = {"significantly better": "significantly_better", "better": "better",
                   "slightly better": "slightly_better", "negligibly better / unsure": "negligibly_better"}
SAFETY_LABELS = {"the preferred answer is safe, the other is not": "chosen_safe",
                 "both answers are safe": "both_safe", "both answers are unsafe": "both_unsafe"}


@dataclass
class Variant:
    """One source of answers: a loaded model at a temperature, under a name the rows record."""

    name: str
    session: Session  # used as the generation engine only: its turns are set to the dialog before each answer

    @property
    def temperature(self) -> float:
        return self.session.temperature


@dataclass
class Comparison:
    """Two answers to one user message, and which variant was shown on which side."""

    user: str
    sides: dict[str, Variant]  # "A" and "B"
    answers: dict[str, str] = field(default_factory=dict)


@dataclass
class Dialog:
    """One annotator's dialog (one per browser tab): the turns so far, carried by the chosen answers."""

    system: str | None
    turns: list[dict] = field(default_factory=list)
    pending: Comparison | None = None

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]


def temperatures(temperature: float | None, pair: str | None, *, against: bool) -> tuple[float, float]:
    """The temperatures of the two variants from --temperature T or --temperatures T1,T2 (default 0.7,1.0 for one
    model, 0.7 for both models with --against)."""
    if temperature is not None and pair is not None:
        raise UserError("give --temperature T (both sides) or --temperatures T1,T2, not both")
    if pair is not None:
        try:
            first, second = (float(t) for t in pair.split(","))
        except ValueError:
            raise UserError(f"--temperatures {pair}: expected two numbers, e.g. 0.7,1.0") from None
        if min(first, second) < 0:
            raise UserError(f"--temperatures {pair}: temperatures are 0 (greedy) or more")
        chosen = (first, second)
    elif temperature is not None:
        chosen = (temperature, temperature)
    else:
        chosen = (0.7, 0.7) if against else (0.7, 1.0)
    if not against and chosen == (0.0, 0.0):
        raise UserError("one model answering greedily twice gives the same answer twice: compare it --against "
                        "another model, or sample it at --temperatures T1,T2")
    return chosen


def check_output(path: Path) -> None:
    """Refuse an existing file that is not JSONL of objects (exit 2 with its line), before any model loads."""
    if path.is_dir():
        raise UserError(f"--output {path}: a folder; give a .jsonl file to append the rows to")
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); the rows are appended to this file, "
                                "so fix or move it first") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object per line; fix or move the file first")


class RowWriter:
    """Appends rows to a JSONL file, one complete line at a time, on disk (fsync) before append returns."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> int:
        """Write `row`; returns how many rows the file holds now."""
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self.lock:
            with self.path.open("ab+") as f:  # append mode: never truncates, and every write lands at the end
                f.seek(0, os.SEEK_END)
                if f.tell():
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a file someone wrote without a final newline: keep lines apart
                        line = "\n" + line
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            with self.path.open("rb") as f:
                return sum(1 for raw in f if raw.strip())


class Annotator:
    """The variants, the drawing of sides, and the row file: shared by every tab of the page."""

    def __init__(self, variants: tuple[Variant, Variant], writer: RowWriter, *, system: str | None, rng=None):
        self.variants, self.writer, self.system = variants, writer, system
        self.rng = rng or random.Random()

    def new_dialog(self) -> Dialog:
        return Dialog(system=self.system)

    def compare(self, dialog: Dialog, user: str) -> Comparison:
        """A new comparison for `user`: the variants put on sides A and B at random."""
        problem = chat_format.check_messages(dialog.messages(user), final_user=True,
                                             tags=chat_format.is_llama2(self.variants[0].session.tokenizer))
        if problem:
            raise UserError(f"cannot send that message: {problem}")
        first, second = self.variants
        if self.rng.random() < 0.5:
            first, second = second, first
        dialog.pending = Comparison(user=user, sides={"A": first, "B": second})
        return dialog.pending

    def stream(self, dialog: Dialog, side: str):
        """The answer of `side` to the pending comparison, in pieces as it is generated (ft.chat's one path)."""
        comparison = dialog.pending
        session = comparison.sides[side].session
        session.system, session.turns = dialog.system, list(dialog.turns)
        session.stop.clear()
        yield from session.stream(comparison.user)
        comparison.answers[side] = session.last.text
        if len(session.turns) - 2 < len(dialog.turns):  # the context was full: the dialog drops its oldest turns too
            dialog.turns = session.turns[:-2]

    def choose(self, dialog: Dialog, side: str, strength: str | None, safety: str | None) -> tuple[dict, int]:
        """Save the row for `side` being better; the dialog goes on with that answer. Returns (row, rows in file)."""
        comparison = dialog.pending
        if comparison is None or set(comparison.answers) != {"A", "B"}:
            raise UserError("there is nothing to choose yet: write a prompt and get the two answers first")
        if strength not in STRENGTH_LABELS.values():
            raise UserError("choose how much better the answer is first")
        if safety not in SAFETY_LABELS.values():
            raise UserError("choose a safety label first")
        other = "B" if side == "A" else "A"
        chosen, rejected = comparison.sides[side], comparison.sides[other]
        row = {"prompt": dialog.messages(comparison.user), "chosen": comparison.answers[side],
               "rejected": comparison.answers[other], "strength": strength, "safety_label": safety,
               "chosen_model": chosen.name, "chosen_temperature": chosen.temperature,
               "rejected_model": rejected.name, "rejected_temperature": rejected.temperature, "chosen_side": side,
               "sides": {s: {"model": v.name, "temperature": v.temperature} for s, v in comparison.sides.items()},
               "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            data.to_pair(row)  # the row `llama-ft reward` and `dpo` will read, checked as they check it
        except data.RowError as e:
            raise UserError(f"this comparison cannot be saved: {e}; get two new answers") from None
        count = self.writer.append(row)
        dialog.turns += [{"role": "user", "content": comparison.user},
                         {"role": "assistant", "content": comparison.answers[side]}]
        dialog.pending = None
        return row, count


def open_annotator(model: str, *, against: str | None, output: Path, temperature: float | None,
                   temperatures_pair: str | None, system: str | None, max_new_tokens: int,
                   quantization: str | None = None) -> Annotator:
    """Check the flags and the row file, then load the model(s): the Annotator the page serves."""
    from ft import chat

    first, second = temperatures(temperature, temperatures_pair, against=against is not None)
    check_output(output)
    net, tokenizer = chat.load(model, quantization=quantization)
    engine = dict(system=system, max_new_tokens=max_new_tokens, top_p=0.9)
    variant_a = Variant(model, Session(net, tokenizer, temperature=first, **engine))
    if against is None:
        variant_b = Variant(model, Session(net, tokenizer, temperature=second, **engine))
    else:
        other, other_tokenizer = chat.load(against, quantization=quantization)
        variant_b = Variant(against, Session(other, other_tokenizer, temperature=second, **engine))
    return Annotator((variant_a, variant_b), RowWriter(output), system=system)
