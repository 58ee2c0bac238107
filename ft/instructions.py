"""System instructions for Ghost Attention: the instruction file, the built-in set, verifiable checks, combining.

An instruction file (JSONL, or YAML holding a list) has one row per instruction:
  {"instruction": "Always answer in French.", "short": "Language: French", "check": "language:fr"}
`short` (optional) is the short form used as the system message some of the time; `check` (optional) is one
check or a list of checks, small and verifiable (IFEval-style):
  uppercase, lowercase, contains:WORD, not_contains:WORD, starts_with:TEXT, ends_with:TEXT, max_words:N,
  language:CODE (ISO 639-1, identified by py3langid, whose model ships in the package).
`family` (optional) names a group of which a dialog gets at most one (the built-in set: hobby, language, figure).
Only instructions with checks are scored in the evaluation.

Without a file, a built-in synthetic set in the Llama 2 paper's three families is used: hobbies ("You enjoy
tennis", checked by the word), language ("Always answer in French", checked by language identification) and
public figures ("Always act as Napoleon from now", short "Figure: Napoleon"; unchecked).

A dialog gets between 1 and `combine` instructions drawn at random, never two that conflict: two of the same
family, two languages, uppercase with lowercase, two different starts or ends, contains:X with not_contains:X.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ft.errors import UserError

CHECK_KINDS = ("uppercase", "lowercase", "contains", "not_contains", "starts_with", "ends_with", "max_words", "language")
_WITH_ARGUMENT = {"contains", "not_contains", "starts_with", "ends_with", "max_words", "language"}
_EXCLUSIVE = {"uppercase": "case", "lowercase": "case", "language": "language", "starts_with": "start",
              "ends_with": "end", "max_words": "length"}


@dataclass(frozen=True)
class Instruction:
    text: str
    short: str | None = None
    checks: tuple[str, ...] = ()
    family: str | None = None

    def conflicts_with(self, other: "Instruction") -> bool:
        if self.text == other.text or (self.family and self.family == other.family):
            return True
        mine, theirs = {_EXCLUSIVE.get(c.partition(":")[0]) for c in self.checks}, {_EXCLUSIVE.get(c.partition(":")[0]) for c in other.checks}
        if (mine & theirs) - {None}:
            return True
        for a, b in ((self, other), (other, self)):
            for check in a.checks:
                kind, _, arg = check.partition(":")
                if kind == "contains" and f"not_contains:{arg}" in b.checks:
                    return True
        return False


@dataclass(frozen=True)
class Combined:
    """The instructions one dialog follows, joined into one."""

    parts: tuple[Instruction, ...] = field(default_factory=tuple)

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.parts)

    @property
    def short(self) -> str:
        return "; ".join(p.short or p.text for p in self.parts)

    @property
    def checks(self) -> list[str]:
        return [c for p in self.parts for c in p.checks]


# ---------------------------------------------------------------- the built-in set (Llama 2's three families)

_HOBBIES = ["tennis", "chess", "painting", "cooking", "hiking", "gardening", "swimming", "photography"]
_LANGUAGES = {"French": "fr", "Spanish": "es", "German": "de", "Italian": "it", "Portuguese": "pt"}
_FIGURES = ["Napoleon", "Cleopatra", "Shakespeare", "Albert Einstein", "Marie Curie", "Julius Caesar"]


def builtin() -> list[Instruction]:
    return (
        [Instruction(f"You enjoy {h}; bring {h} into every answer.", f"Hobby: {h}", (f"contains:{h}",), "hobby")
         for h in _HOBBIES]
        + [Instruction(f"Always answer in {name}.", f"Language: {name}", (f"language:{code}",), "language")
           for name, code in _LANGUAGES.items()]
        + [Instruction(f"Always act as {f} from now.", f"Figure: {f}", (), "figure") for f in _FIGURES]
    )


# ---------------------------------------------------------------- the file


def load(path: str | None) -> list[Instruction]:
    """The instructions of a JSONL or YAML file, every row checked (file and line/row in the error), or the built-in set."""
    if path is None:
        return builtin()
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"gatt.instructions: {file} not found (paths are relative to the current directory)")
    text = file.read_text(encoding="utf-8-sig")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            rows = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{file}: not valid YAML: {e}") from None
        if not isinstance(rows, list):
            raise UserError(f"{file}: expected a YAML list of instructions")
        located = [(f"row {i}", row) for i, row in enumerate(rows, start=1)]
    else:
        located = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    located.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{file} line {n}: not valid JSON ({e.msg})") from None
    instructions = []
    for where, row in located:
        try:
            instructions.append(parse(row))
        except ValueError as e:
            raise UserError(f"{file} {where}: {e}") from None
    if not instructions:
        raise UserError(f"{file}: no instructions")
    return instructions


def parse(row) -> Instruction:
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with 'instruction', got {type(row).__name__}")
    unknown = set(row) - {"instruction", "short", "check", "family"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} (expected instruction, short, check, family)")
    text, short, family = row.get("instruction"), row.get("short"), row.get("family")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'instruction' must be non-empty text")
    for name, value in (("short", short), ("family", family)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"'{name}' must be non-empty text")
    checks = row.get("check")
    checks = [] if checks is None else [checks] if isinstance(checks, str) else checks
    if not isinstance(checks, list) or not all(isinstance(c, str) for c in checks):
        raise ValueError("'check' must be a check or a list of checks")
    for check in checks:
        validate_check(check)
    return Instruction(text.strip(), short.strip() if short else None, tuple(checks), family)


def validate_check(check: str) -> None:
    kind, sep, arg = check.partition(":")
    if kind not in CHECK_KINDS:
        raise ValueError(f"unknown check {check!r} (expected one of {', '.join(CHECK_KINDS)}; "
                         "contains, not_contains, starts_with, ends_with, max_words and language take :ARGUMENT)")
    if (kind in _WITH_ARGUMENT) != bool(sep and arg):
        raise ValueError(f"check {check!r}: {kind} {'needs' if kind in _WITH_ARGUMENT else 'takes no'} :ARGUMENT")
    if kind == "max_words" and not arg.isdigit():
        raise ValueError(f"check {check!r}: max_words needs a whole number")
    if kind == "language" and arg not in _languages():
        raise ValueError(f"check {check!r}: unknown language code (py3langid knows {len(_languages())}: e.g. en, fr, de, es)")


# ---------------------------------------------------------------- checking an answer


def passes(answer: str, checks: list[str]) -> bool:
    return all(check_one(answer, c) for c in checks)


def check_one(answer: str, check: str) -> bool:
    kind, _, arg = check.partition(":")
    text = answer.strip()
    letters = [c for c in text if c.isalpha()]
    if kind == "uppercase":
        return bool(letters) and all(c.isupper() for c in letters)
    if kind == "lowercase":
        return bool(letters) and all(c.islower() for c in letters)
    if kind in ("contains", "not_contains"):
        found = arg.lower() in text.lower()
        return found if kind == "contains" else not found
    if kind == "starts_with":
        return text.lower().startswith(arg.lower())
    if kind == "ends_with":
        return text.lower().endswith(arg.lower())
    if kind == "max_words":
        return len(text.split()) <= int(arg)
    if kind == "language":
        return bool(text) and _identify(text) == arg
    raise ValueError(f"unknown check {check!r}")


def _identify(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


@functools.cache
def _languages() -> set[str]:
    import py3langid

    return {language for language, _ in py3langid.rank("a")}


# ---------------------------------------------------------------- drawing


def draw(instructions: list[Instruction], rng: random.Random, combine: int, *, checked_only: bool = False) -> Combined:
    """1 to `combine` instructions, none conflicting with another."""
    pool = [i for i in instructions if i.checks] if checked_only else list(instructions)
    if not pool:
        raise UserError("gatt: no instruction has a check, so none can be evaluated; add checks to some")
    wanted = rng.randint(1, combine)
    picked: list[Instruction] = []
    for candidate in rng.sample(pool, len(pool)):
        if len(picked) == wanted:
            break
        if not any(candidate.conflicts_with(p) for p in picked):
            picked.append(candidate)
    return Combined(tuple(picked))
