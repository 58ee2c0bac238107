"""Data loading: formats, row checks with row numbers, skip counts, label masks, truncation."""

import json

import pytest

from conftest import cli, write_jsonl
from ft import data
from ft.errors import UserError
from ft.recipe import DataSource

QA = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]


def src(path, **kw):
    return DataSource(path=str(path), **kw)


def test_each_format_is_detected_and_converted(tmp_path):
    rows = {
        "messages": {"messages": QA},
        "sharegpt": {"conversations": [{"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
        "alpaca": {"instruction": "What is two plus two?", "input": "", "output": "Four."},
        "prompt_completion": {"prompt": "What is two plus two?", "completion": "Four."},
    }
    for fmt, row in rows.items():
        assert data.detect_format(row) == fmt
        dialogs, report = data.load_dialogs([src(write_jsonl(tmp_path / f"{fmt}.jsonl", [row]))], skip_invalid=False)
        assert dialogs[0]["messages"] == QA, fmt
        assert report.rows == 1


def test_alpaca_input_is_appended_to_the_instruction():
    messages = data.to_messages({"instruction": "Translate.", "input": "chat", "output": "cat"}, "alpaca")
    assert messages[0] == {"role": "user", "content": "Translate.\n\nchat"}


def test_sharegpt_system_and_prompt_completion_messages():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    assert data.to_messages(row, "sharegpt")[0] == {"role": "system", "content": "Be brief."}
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}
    assert [m["role"] for m in data.to_messages(row, "prompt_completion")] == ["system", "user", "assistant"]


def test_json_array_csv_and_parquet_files(tmp_path):
    import datasets

    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Q1", "output": "A1"}, {"instruction": "Q2", "output": "A2"}]))
    datasets.Dataset.from_list([{"prompt": "Q", "completion": "A"}] * 3).to_csv(str(tmp_path / "b.csv"), index=False)
    datasets.Dataset.from_list([{"messages": QA}] * 2).to_parquet(str(tmp_path / "c.parquet"))
    dialogs, report = data.load_dialogs([src(tmp_path / "a.json"), src(tmp_path / "b.csv"), src(tmp_path / "c.parquet")], skip_invalid=False)
    assert report.rows == 7 and len(dialogs) == 7
    assert dialogs[0]["origin"].endswith("a.json row 1") and dialogs[2]["origin"].endswith("b.csv row 1")


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "q"}]}, "must end with an assistant answer"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty assistant answer"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "expected role 'user'"),
    ({"messages": [{"role": "user", "content": "[INST] q"}, {"role": "assistant", "content": "a"}]}, "chat-format tag"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "content must be text"),
    ({"messages": "hello"}, "wrong type"),
    ({"nothing": 1}, "missing field 'messages'"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_row_stops_with_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": QA}, {"messages": QA}, bad, {"messages": QA}])
    with pytest.raises(UserError) as err:
        data.load_dialogs([src(path, format="messages")], skip_invalid=False)
    message = str(err.value)
    assert f"{path} line 3:" in message and reason in message and "skip_invalid" in message


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": QA}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"d\.jsonl line 2: not valid JSON"):
        data.load_dialogs([src(path)], skip_invalid=False)


def test_invalid_utf8_names_the_line_and_byte_offset(tmp_path):
    good = (json.dumps({"messages": QA}) + "\n").encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + good + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(UserError) as err:
        data.load_dialogs([src(path)], skip_invalid=False)
    offset = 2 * len(good) + len(b'{"messages": [{"role": "user", "content": "caf')
    assert f"d.jsonl line 3: not UTF-8 text (byte {offset} of the file" in str(err.value)
    array = tmp_path / "a.json"
    content = b'[{"instruction": "Q", "output": "\xff"}]'
    array.write_bytes(content)
    with pytest.raises(UserError, match=rf"a\.json line 1: not UTF-8 text \(byte {content.index(0xFF)} of the file"):
        data.load_dialogs([src(array)], skip_invalid=False)


def test_invalid_utf8_through_the_cli_exits_2_without_traceback(tmp_path):
    from conftest import run_cli

    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps({"messages": QA}) + "\n").encode() + b"\x80\x81\n")
    result = cli("sft", "recipes/tiny.yaml", "--output-dir", tmp_path / "run", "--set", f"data.train={path}")
    assert result.returncode == 2 and f"{path} line 2: not UTF-8 text" in result.stderr
    assert "Traceback" not in result.stderr


def test_files_starting_with_a_byte_order_mark_are_read(tmp_path):
    """Spreadsheet programs save CSV and JSON with a UTF-8 byte-order mark."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.jsonl").write_bytes(bom + (json.dumps({"messages": QA}) + "\n").encode())
    (tmp_path / "a.json").write_bytes(bom + json.dumps([{"instruction": "What is two plus two?", "output": "Four."}]).encode())
    (tmp_path / "l.json").write_bytes(bom + (json.dumps({"prompt": "What is two plus two?", "completion": "Four."}) + "\n").encode())
    (tmp_path / "b.csv").write_bytes(bom + b'prompt,completion\n"What is two plus two?","Four."\n')
    sources = [src(tmp_path / name) for name in ("d.jsonl", "a.json", "l.json", "b.csv")]
    dialogs, report = data.load_dialogs(sources, skip_invalid=False)
    assert report.rows == 4 and [d["messages"] for d in dialogs] == [QA] * 4


def test_undetectable_format_names_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"line 1: cannot tell the format from the fields \['answer', 'question'\]"):
        data.load_dialogs([src(path)], skip_invalid=False)


def test_skip_invalid_counts_and_reports_skipped_rows(tmp_path):
    rows = [{"messages": QA}] + [bad for bad, _ in BAD_ROWS[:4]] + [{"messages": QA}]
    dialogs, report = data.load_dialogs([src(write_jsonl(tmp_path / "d.jsonl", rows), format="messages")], skip_invalid=True)
    assert len(dialogs) == 2 and report.rows == 6 and report.skipped_invalid == 4
    assert "4 invalid rows skipped" in report.summary("train")
    assert report.notes[0].endswith("line 2: the dialog must end with an assistant answer")


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        data.load_dialogs([src(tmp_path / "nope.jsonl")], skip_invalid=False)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unsupported file type"):
        data.load_dialogs([src(tmp_path / "x.txt")], skip_invalid=False)


def test_hub_dataset_offline_is_a_user_error():
    with pytest.raises(UserError, match="someone/some-dataset: cannot load dataset"):
        data.load_dialogs([src("someone/some-dataset")], skip_invalid=False)


def test_labels_are_minus_100_except_answers_and_eos(tokenizer):
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    report = data.Report()
    [example] = data.tokenize([{"messages": dialog, "origin": "t"}], tokenizer, 4096, report)
    ids, labels = example["input_ids"], example["labels"]
    trained = [(i, t) for i, (t, l) in enumerate(zip(ids, labels)) if l != -100]
    assert all(labels[i] == ids[i] for i, _ in trained)
    # each answer as Meta encodes it: "▁" + answer, the trailing space as "▁", then EOS
    assert tokenizer.decode([t for _, t in trained]) == "Paris. </s> Rome. </s>"
    assert [t for _, t in trained].count(tokenizer.eos_token_id) == 2  # the model learns to stop after each answer
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    untrained = tokenizer.decode([t for t, l in zip(ids, labels) if l == -100])
    for text in ("Be brief.", "capital of France", "And of Italy", "[INST]", "[/INST]"):
        assert text in untrained


def test_answers_cut_off_by_max_length_are_dropped_and_counted(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Answer."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend. " * 10}]
    report = data.Report()
    examples = data.tokenize([{"messages": long_prompt, "origin": "f line 1"}, {"messages": short, "origin": "f line 2"}], tokenizer, 40, report)
    assert len(examples) == 1 and report.dropped_too_long == 1 and report.truncated == 1
    assert len(examples[0]["input_ids"]) == 40
    assert "dropped f line 1" in report.notes[0]
    assert "1 dropped (answer entirely beyond max_length)" in report.summary("train")
    with pytest.raises(UserError, match="every example was dropped"):
        data.tokenize([{"messages": long_prompt, "origin": "x"}], tokenizer, 40, data.Report())


def test_preference_rows_give_prompts_for_rejection_sampling_and_ppo():
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Peru?\n\nAssistant: Lima.", "rejected": "x"}
    assert data.to_prompt(hh)["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                            {"role": "user", "content": "Capital of Peru?"}]
    with pytest.raises(data.RowError, match="'chosen' dialog"):
        data.to_prompt({"question": "Q"})
