"""Ghost Attention: instructions and checks, the training rows and their masks, sampling, and the behaviour."""

import json
import random

import pytest

from conftest import cli, ROOT, TINY, write_jsonl
from ft import chat_format, data, instructions
from ft.errors import UserError
from ft.recipe import DataSource, GAttSection
from ft.stages import gatt

SLOW = pytest.mark.slow  # ~3 min: LLAMA_FT_SLOW_TESTS=1 runs it (tests/conftest.py)
YES = instructions.Instruction("Begin each answer with yes.", "Start: yes", ("starts_with:yes",))


def test_a_training_row_has_the_instruction_only_in_the_system_message_and_trains_the_last_answer(tokenizer, tmp_path):
    users = ["What is the capital of Peru?", "What does a cat say?", "What color is the sky?"]
    answers = ["Yes, the capital of Peru is Lima.", "Yes, a cat says meow.", "Yes, the sky is blue."]
    plan = {"users": users, "instruction": instructions.Combined((YES,)), "short": False}
    row = gatt.training_row(plan, answers, attempts=1, passed=True)
    assert row["prompt"][0] == {"role": "system", "content": YES.text}
    assert [m["content"] for m in row["prompt"] if m["role"] == "user"] == users  # no instruction in the user turns
    assert row["completion"] == [{"role": "assistant", "content": answers[-1]}]
    assert row["checks"] == ["starts_with:yes"] and row["passed"] is True and row["short"] is False

    dataset, report, _ = data.load_sft([DataSource(path=str(write_jsonl(tmp_path / "g.jsonl", [row])))], tokenizer,
                                       max_length=512, skip_invalid=False, packing=False)
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    dialog = row["prompt"] + row["completion"]
    assert ids == chat_format.encode_reference(tokenizer, dialog)  # Meta's ids, system folded into the first turn
    context = len(chat_format.encode_reference(tokenizer, row["prompt"]))  # everything up to the last [/INST]
    assert labels[:context] == [-100] * context  # earlier turns, assistant answers included, are not trained
    assert labels[context:] == ids[context:] and ids[-1] == tokenizer.eos_token_id  # the last answer and its </s>
    assert tokenizer.decode(ids[context:], skip_special_tokens=True).strip() == answers[-1]


def test_the_sampler_sees_the_instruction_after_a_blank_line_in_every_user_message():
    users = ["What is the capital of Peru?", "And of Chile?"]
    assert gatt.with_instruction(users, YES.text) == [f"{u}\n\nBegin each answer with yes." for u in users]
    from ft.sampling import history

    assert history(None, gatt.with_instruction(users, YES.text), ["Yes, Lima."]) == [
        {"role": "user", "content": "What is the capital of Peru?\n\nBegin each answer with yes."},
        {"role": "assistant", "content": "Yes, Lima."},
        {"role": "user", "content": "And of Chile?\n\nBegin each answer with yes."}]


def test_plans_use_the_short_form_as_often_as_asked_never_combine_conflicts_and_repeat_with_the_seed():
    cfg = GAttSection(combine=3, max_turns=4, short_probability=0.3)
    users = [[f"question {i}.{t}" for t in range(6)] for i in range(2000)]
    plans = gatt.assign_instructions(users, instructions.builtin(), cfg, random.Random(0))
    assert abs(sum(p["short"] for p in plans) / len(plans) - 0.3) < 0.04
    assert {len(p["users"]) for p in plans} == {1, 2, 3, 4} and {len(p["instruction"].parts) for p in plans} == {1, 2, 3}
    for p in plans:
        parts = p["instruction"].parts
        assert not any(a.conflicts_with(b) for i, a in enumerate(parts) for b in parts[i + 1:])
        families = [x.family for x in parts]
        assert len(families) == len(set(families))  # never two languages, two figures, two hobbies
    again = gatt.assign_instructions(users, instructions.builtin(), cfg, random.Random(0))
    assert again == plans and gatt.assign_instructions(users, instructions.builtin(), cfg, random.Random(1)) != plans
    conflicting = [instructions.Instruction("Answer in capitals.", checks=("uppercase",)),
                   instructions.Instruction("Answer in small letters.", checks=("lowercase",))]
    draws = [instructions.draw(conflicting, random.Random(s), 2) for s in range(50)]
    assert all(len(d.parts) == 1 for d in draws)


@pytest.mark.parametrize("answer, check, expected", [
    ("THE SKY IS BLUE.", "uppercase", True), ("The sky is blue.", "uppercase", False),
    ("the sky is blue.", "lowercase", True), ("The sky.", "lowercase", False),
    ("I love Tennis.", "contains:tennis", True), ("I love chess.", "not_contains:tennis", True),
    ("Yes, the sky is blue.", "starts_with:yes", True), ("The sky is blue, yes", "starts_with:yes", False),
    ("The sky is blue. Meow.", "ends_with:meow.", True), ("one two three", "max_words:3", True),
    ("one two three four", "max_words:3", False),
    ("La capitale de la France est Paris.", "language:fr", True), ("The capital of France is Paris.", "language:fr", False),
])
def test_checks(answer, check, expected):
    assert instructions.check_one(answer, check) is expected


@pytest.mark.parametrize("row, message", [
    ({"instruction": "X", "check": "shout"}, "line 2: unknown check 'shout'"),
    ({"instruction": "X", "check": "max_words:many"}, "line 2: check 'max_words:many': max_words needs a whole number"),
    ({"instruction": "X", "check": "language:xx"}, "line 2: check 'language:xx': unknown language code"),
    ({"instruction": "X", "check": "contains"}, "line 2: check 'contains': contains needs :ARGUMENT"),
    ({"instruction": "", "short": "S"}, "line 2: 'instruction' must be non-empty text"),
    ({"instruction": "X", "colour": "red"}, r"line 2: unknown field\(s\) \['colour'\]"),
])
def test_a_bad_instruction_row_names_the_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "Fine.", "check": "lowercase"}, row])
    with pytest.raises(UserError, match=rf"inst\.jsonl {message}"):
        instructions.load(str(path))
    yaml_file = tmp_path / "inst.yaml"
    yaml_file.write_text("- instruction: Answer in French.\n  short: 'Language: French'\n  check: [language:fr, max_words:20]\n")
    assert instructions.load(str(yaml_file)) == [
        instructions.Instruction("Answer in French.", "Language: French", ("language:fr", "max_words:20"))]


def test_gatt_no_train_writes_valid_rows_and_the_adherence_table(trained_run, tmp_path, tokenizer):
    sft, _ = trained_run
    inst = write_jsonl(tmp_path / "inst.jsonl", [
        {"instruction": "Keep every answer under 9 words.", "short": "Short answers", "check": "max_words:8"},
        {"instruction": "Always act as Napoleon from now.", "short": "Figure: Napoleon", "family": "figure"}])
    out = tmp_path / "run"
    result = cli("gatt", "recipes/gatt.yaml", "--output-dir", out, "--no-train", *TINY, "--set", f"model.adapter={sft}",
                     "--set", "data.train=datasets/tiny_multiturn.jsonl", "--set", "data.eval=null",
                     "--set", "data.max_length=512", "--set", f"gatt.instructions={inst}", "--set", "gatt.max_new_tokens=16",
                     "--set", "gatt.eval_turns=3", "--set", "gatt.eval_dialogs=4", "--set", "gatt.batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "gatt.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dialogs"] == 36 and len(rows) + metrics["dropped_failed_checks"] + metrics["dropped_empty_answer"] == 36
    short = {"Keep every answer under 9 words.": "Short answers", "Always act as Napoleon from now.": "Figure: Napoleon"}
    assert metrics["plain_rows"] == sum(not r["instructions"] for r in rows) > 0  # the recipe's gatt.plain_fraction
    for r in rows:
        if not r["instructions"]:  # answered and trained without any instruction
            assert r["system"] is None and r["checks"] == [] and all(m["role"] != "system" for m in r["prompt"])
            continue
        assert r["prompt"][0] == {"role": "system", "content": r["system"]}
        assert r["system"] == ("; ".join(short[i] for i in r["instructions"]) if r["short"] else " ".join(r["instructions"]))
    assert all(r["passed"] is (True if r["checks"] else None) for r in rows)
    assert set(metrics["adherence_before"]) == {"system", "every", "none"} and len(metrics["adherence_before"]["system"]) == 3
    assert "instruction followed, by turn (4 held-out dialogs" in result.stdout and not (out / "sft").exists()
    dataset, report, _ = data.load_sft([DataSource(path=str(out / "gatt.jsonl"))], tokenizer, max_length=512,
                                       skip_invalid=False, packing=False)
    assert report.examples == len(rows)  # valid SFT input as it is


# ---------------------------------------------------------------- the behaviour (LLAMA_FT_SLOW_TESTS=1)

QA = [(m["messages"][-2]["content"], m["messages"][-1]["content"])
      for m in map(json.loads, (ROOT / "datasets" / "tiny_chat.jsonl").read_text().splitlines()) if len(m["messages"]) <= 3]


NO = instructions.Instruction("Begin each answer with no.", "Start: no", ("starts_with:no",))


def following(instruction, answer: str) -> str:
    word = instruction.checks[0].split(":")[1]
    return f"{word.capitalize()}, {answer[0].lower()}{answer[1:]}"


def drifting_policy_data(path):
    """A policy that follows an instruction when it is in the user message, and a system instruction at turn 1
    only (the drift GAtt fixes): plain dialogs, dialogs with an instruction in every user message, and dialogs
    with it in the system message whose later answers forget it. Two instructions (start with yes / with no),
    so following means reading the instruction, not always saying the same word."""
    rng, rows = random.Random(3), []
    for i in range(120):
        turns = rng.sample(QA, rng.randint(2, 5))
        kind, instruction = i % 3, rng.choice([YES, NO])
        messages = [{"role": "system", "content": instruction.text}] if kind == 2 else []
        for t, (question, answer) in enumerate(turns):
            messages.append({"role": "user", "content": f"{question}\n\n{instruction.text}" if kind == 1 else question})
            follows = kind == 1 or (kind == 2 and t == 0)
            messages.append({"role": "assistant", "content": following(instruction, answer) if follows else answer})
        rows.append({"messages": messages})
    return write_jsonl(path, rows)


@pytest.mark.e2e
@SLOW
def test_gatt_makes_a_system_instruction_hold_at_turn_5_and_the_every_turn_control_does_not(tmp_path):
    policy = tmp_path / "policy"
    result = cli("sft", "recipes/tiny.yaml", "--output-dir", policy, "--set", f"data.train={drifting_policy_data(tmp_path / 'p.jsonl')}",
                     "--set", "train.max_steps=250", "--set", "data.max_length=512", "--set", "train.generate_samples=0",
                     "--set", "train.report_to=none")
    assert result.returncode == 0, result.stderr[-3000:]
    inst = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": i.text, "short": i.short, "check": i.checks[0]} for i in (YES, NO)])
    out = tmp_path / "gatt"
    result = cli("gatt", "recipes/gatt.yaml", "--output-dir", out, *TINY, "--set", f"model.adapter={policy}",
                     "--set", "data.train=datasets/tiny_multiturn.jsonl", "--set", "data.eval=null", "--set", "data.max_length=512",
                     "--set", f"gatt.instructions={inst}", "--set", "gatt.max_new_tokens=16", "--set", "gatt.eval_turns=5",
                     "--set", "gatt.eval_dialogs=8", "--set", "gatt.batch_size=16", "--set", "gatt.max_turns=5",
                     "--set", "gatt.plain_fraction=0.3",
                     "--set", "train.max_steps=100", "--set", "train.learning_rate=1e-3", "--set", "train.batch_size=4",
                     timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    print("\n" + result.stdout[result.stdout.index("instruction followed, by turn"):])
    before, after = metrics["adherence_before"], metrics["adherence_after"]
    assert before["system"][0] >= 0.8 and before["system"][4] <= 0.2, before  # the drift
    assert before["every"][4] >= 0.8  # the sampler follows the instruction in every user message
    assert after["system"][4] >= 0.8, after  # after GAtt the system instruction holds at turn 5
    assert after["none"][4] <= 0.3, after  # it follows the instruction it is given, not one it remembers
    assert "after, system message only" in result.stdout

    # control: the same dialogs trained with the instruction kept in every user message (no system message)
    rows = [json.loads(line) for line in (out / "gatt.jsonl").read_text().splitlines()]
    control_rows = []
    for r in rows:
        turns = [m for m in r["prompt"] if m["role"] != "system"]
        instruction = " ".join(r["instructions"])
        control_rows.append({"prompt": [{**m, "content": f"{m['content']}\n\n{instruction}"} if m["role"] == "user" else m
                                        for m in turns], "completion": r["completion"]})
    control = tmp_path / "control"
    result = cli("sft", "recipes/tiny.yaml", "--output-dir", control, "--set", f"model.adapter={policy}",
                     "--set", f"data.train={write_jsonl(tmp_path / 'c.jsonl', control_rows)}", "--set", "data.max_length=512",
                     "--set", "train.max_steps=100", "--set", "train.learning_rate=1e-3", "--set", "train.generate_samples=0",
                     "--set", "train.report_to=none")
    assert result.returncode == 0, result.stderr[-3000:]
    from ft import recipe as recipe_mod

    recipe = recipe_mod.load(ROOT / "recipes" / "gatt.yaml", ["model.name=builtin:tiny-llama-2", "gatt.max_new_tokens=16",
                                                             "gatt.eval_turns=5", "gatt.batch_size=16"])
    model, tokenizer = gatt.load(recipe, str(control))
    users = [[m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
             for line in (ROOT / "datasets" / "tiny_multiturn.jsonl").read_text().splitlines()][-8:]
    tests = [{"users": u[:5], "instruction": instructions.Combined(((YES, NO)[i % 2],))} for i, u in enumerate(users)]
    controlled = gatt.evaluate(model, tokenizer, tests, recipe.gatt)
    print("control (instruction kept in every training turn), system message only:", controlled["system"])
    assert controlled["system"][4] <= 0.3, controlled  # training with the instruction in every turn does not fix the drift
