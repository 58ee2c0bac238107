"""The model's own chat format (model.chat_format: model / auto), checked by token ids on three published formats.

* ChatML: SmolLM2-135M-Instruct's real tokenizer and template (the `smol` fixture; it injects a default system
  message, pads with EOS = `<|im_end|>`).
* Llama 3 (Meta-Llama-3-8B-Instruct's template, written from its published tokenizer_config.json): built locally on
  the SmolLM2 BPE vocabulary with Llama 3's pre-tokenizer split and special tokens added (`<|begin_of_text|>` BOS, `<|end_of_text|>` EOS as
  first released, `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`), no unk and no pad, as Llama 3 ships.
* Zephyr (TinyLlama-1.1B-Chat-v1.0's template, from its tokenizer_config.json): on the built-in Llama 2 SentencePiece
  tokenizer, which is TinyLlama's tokenizer family, with pad = EOS = `</s>` as TinyLlama-Chat publishes it.
These are tokenizer fixtures only (no model reads their new ids).
"""

import json

import pytest
from tokenizers import Regex, pre_tokenizers

from conftest import a, s, u

from ft import chat_format, data, models
from ft.errors import UserError
from ft.recipe import DataSource

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "zephyr": "</s>"}


@pytest.fixture(scope="module")
def folders(smol, tiny_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("templates")
    llama3 = AutoTokenizer.from_pretrained(str(smol))
    llama3.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                               "extra_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    llama3.unk_token, llama3.pad_token, llama3.chat_template = None, None, LLAMA3
    # Llama 3's own pre-tokenizer split (tokenizer.json of Meta-Llama-3-8B-Instruct): "\n\n" is one piece whether
    # text follows or not, so its generation prompt's ids are a prefix of the answered dialog's
    llama3.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama3.save_pretrained(str(root / "llama3"))
    zephyr = AutoTokenizer.from_pretrained(str(tiny_dir), legacy=True)
    zephyr.pad_token, zephyr.chat_template = zephyr.eos_token, ZEPHYR
    zephyr.save_pretrained(str(root / "zephyr"))
    return {"chatml": str(smol), "llama3": str(root / "llama3"), "zephyr": str(root / "zephyr")}


@pytest.fixture(scope="module")
def tokenizers(folders):
    return {name: models.load_tokenizer(folder, training=True) for name, folder in folders.items()}


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def trained_runs(ids, mask):
    """The trained spans as lists of ids, in order."""
    runs, current = [], []
    for t, keep in zip(ids, mask):
        if keep:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


NAMES = ["chatml", "llama3", "zephyr"]


@pytest.mark.parametrize("name", NAMES)
def test_auto_picks_the_models_own_template_and_its_end_of_turn(tokenizers, name):
    tok = tokenizers[name]
    assert not chat_format.is_llama2(tok)
    assert tok.convert_ids_to_tokens(chat_format.end_of_turn(tok)) == EOT[name]
    assert tok.eos_token == EOT[name]  # generation stops where a turn ends (Llama 3: EOS made <|eot_id|>)
    assert "model" in chat_format.describe(tok) and EOT[name] in chat_format.describe(tok)


@pytest.mark.parametrize("name", NAMES)
def test_pad_is_an_existing_token_distinct_from_eos_bos_and_the_template(tokenizers, folders, name):
    from transformers import AutoTokenizer

    tok = tokenizers[name]
    vocabulary = len(AutoTokenizer.from_pretrained(folders[name]))
    assert tok.pad_token_id is not None and tok.pad_token_id < vocabulary == len(tok)  # nothing added
    assert tok.pad_token_id not in {tok.eos_token_id, tok.bos_token_id, chat_format.end_of_turn(tok)}
    assert tok.pad_token_id not in chat_format.template_ids(tok)
    if name == "chatml":
        assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)  # SmolLM2's unk, not its EOS (id 2)
    if name == "zephyr":
        assert tok.pad_token == "<unk>" and tok.pad_token_id == 0  # TinyLlama-Chat pads with </s>: unk instead
    if name == "llama3":
        assert tok.pad_token == "<|endoftext|>" or tok.pad_token_id in chat_format.special_ids(tok)


@pytest.mark.parametrize("name", NAMES)
def test_single_answer_is_trained_with_its_end_of_turn_only(tokenizers, name):
    tok = tokenizers[name]
    dialog = [u("What is the capital of France?"), a("Paris.")]
    ids, mask = chat_format.encode(tok, dialog)
    eot = chat_format.end_of_turn(tok)
    [trained] = trained_runs(ids, mask)
    assert trained[-1] == eot and tok.decode(trained[:-1]) == "Paris."
    if name != "zephyr":  # byte-level BPE: the answer's ids as the text alone encodes (SentencePiece adds no prefix here)
        assert trained == encode(tok, "Paris.") + [eot]
    # the prompt with the generation prompt is exactly what precedes the answer
    prompt = chat_format.prompt_ids(tok, dialog[:1])
    assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt)
    start = len(prompt)
    assert mask[start:start + len(trained)] == [1] * len(trained) and ids[start + len(trained) - 1] == eot
    assert all(m == 0 for m in mask[start + len(trained):])  # not the newline after the end of turn (ChatML, Zephyr)


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_with_system_trains_every_answer_not_headers_or_system(tokenizers, name):
    tok = tokenizers[name]
    dialog = [s("Be brief."), u("Capital of France?"), a("Paris."), u("And of Italy?"), a("Rome.")]
    ids, mask = chat_format.encode(tok, dialog)
    eot = chat_format.end_of_turn(tok)
    runs = trained_runs(ids, mask)
    assert len(runs) == 2 and all(r[-1] == eot and r.count(eot) == 1 for r in runs)
    assert [tok.decode(r[:-1]).strip() for r in runs] == ["Paris.", "Rome."]
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    for text in ("Be brief.", "Capital of France?", "And of Italy?", "assistant"):
        assert text in untrained
    # every answer starts right after the generation prompt of the dialog before it
    for i, run in zip((3, 5), runs):
        prompt = chat_format.prompt_ids(tok, dialog[:i - 1])
        assert ids[len(prompt):len(prompt) + len(run)] == run


@pytest.mark.parametrize("name", NAMES)
def test_training_pipeline_packs_prompt_completion_context_and_reports(tokenizers, name, tmp_path):
    """data.load_sft on a file: earlier answers in a prompt_completion prompt are context (GAtt's last-turn-only
    loss), packing keeps each example's labels, and the report names the format and the pad."""
    tok = tokenizers[name]
    rows = [
        {"prompt": [s("Speak like a pirate."), u("Hi"), a("Arr, hello."), u("Capital of France?")],
         "completion": [a("Paris, matey.")]},
        {"messages": [u("2+2?"), a("4.")]},
        {"messages": [u("Colour of the sky?"), a("Blue."), u("And grass?"), a("Green.")]},
    ]
    (tmp_path / "pc.jsonl").write_text(json.dumps(rows[0]) + "\n")  # one format per file
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    sources = [DataSource(path=str(tmp_path / "pc.jsonl")), DataSource(path=str(tmp_path / "m.jsonl"))]
    unpacked, report, _ = data.load_sft(sources, tok, max_length=512, skip_invalid=False, packing=False)
    eot = chat_format.end_of_turn(tok)
    trained = [trained_runs(ex["input_ids"], [label != -100 for label in ex["labels"]]) for ex in unpacked]
    assert [[tok.decode(r[:-1]).strip() for r in runs] for runs in trained] == [["Paris, matey."], ["4."], ["Blue.", "Green."]]
    assert all(r[-1] == eot for runs in trained for r in runs)
    assert report.chat_format == chat_format.describe(tok) and str(tok.pad_token_id) in report.pad
    assert "chat format model" in report.summary("train") and tok.pad_token in report.summary("train")
    packed, _, _ = data.load_sft(sources, tok, max_length=512, skip_invalid=False, packing=True)
    assert len(packed) == 1 and sorted(packed[0]["seq_lengths"]) == sorted(len(ex["input_ids"]) for ex in unpacked)
    batch = data.PackedCollator(tok.pad_token_id)([packed[0], {"input_ids": [1, 2], "labels": [-100, 2],
                                                               "seq_lengths": [2]}])
    labels, at, segments = batch["labels"][0].tolist(), 0, []
    for n in packed[0]["seq_lengths"]:
        segments.append(tuple(labels[at:at + n]))
        at += n
    assert sorted(segments) == sorted(tuple(ex["labels"]) for ex in unpacked)  # each example's labels, unchanged
    assert batch["labels"][1, 2:].eq(-100).all() and int(batch["padding_tokens"]) == batch["input_ids"].shape[1] - 2


def test_llama2_rows_keep_their_tag_checks_and_model_rows_do_not(tokenizers, tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [u("what does [INST] mean?"), a("A Llama 2 tag.")]}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl line 1: .*tag"):
        data.load_sft([DataSource(path=str(path))], tokenizer, max_length=128, skip_invalid=False, packing=False)
    examples, report, _ = data.load_sft([DataSource(path=str(path))], tokenizers["chatml"], max_length=128,
                                        skip_invalid=False, packing=False)
    assert report.examples == 1 and report.chat_format.startswith("model")
    assert tokenizer.chat_template == chat_format.TEMPLATE and chat_format.describe(tokenizer) == "llama2"


def test_a_row_the_template_cannot_render_stops_with_file_and_line(folders, tmp_path):
    from transformers import AutoTokenizer

    no_system = AutoTokenizer.from_pretrained(folders["llama3"])
    no_system.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + LLAMA3)
    no_system.save_pretrained(str(tmp_path / "tok"))
    tok = models.load_tokenizer(str(tmp_path / "tok"), chat_format="model")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [u("q"), a("a")]}) + "\n"
                    + json.dumps({"messages": [s("sys"), u("q"), a("a")]}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl line 2: .*System role not supported"):
        data.load_sft([DataSource(path=str(path))], tok, max_length=128, skip_invalid=False, packing=False)
    examples, report, _ = data.load_sft([DataSource(path=str(path))], tok, max_length=128, skip_invalid=True,
                                        packing=False)
    assert report.skipped_invalid == 1 and len(examples) == 1


def test_a_template_whose_prefixes_are_not_prefixes_is_refused(folders, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["chatml"])
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")
    tok.save_pretrained(str(tmp_path / "bad"))
    with pytest.raises(UserError, match=r"'.*bad'.*cannot be trained on"):
        models.load_tokenizer(str(tmp_path / "bad"))


def test_model_format_needs_a_template_and_llama2_forces_meta_format(tiny_dir, folders, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_dir))
    plain.chat_template = None
    plain.save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="no chat_template"):
        models.load_tokenizer(str(tmp_path), chat_format="model")
    assert chat_format.is_llama2(models.load_tokenizer(str(tmp_path)))  # auto: no template -> Llama 2's
    forced = models.load_tokenizer(folders["zephyr"], chat_format="llama2")
    assert chat_format.is_llama2(forced) and forced.pad_token == "<unk>"


@pytest.mark.parametrize("name", NAMES)
def test_saved_tokenizer_keeps_the_trained_template(tokenizers, name, tmp_path):
    tok = tokenizers[name]
    tok.save_pretrained(str(tmp_path))
    again = models.load_tokenizer(str(tmp_path))
    dialog = [s("Be brief."), u("Hi"), a("Hello."), u("Bye")]
    assert again.chat_template == tok.chat_template and again.pad_token_id == tok.pad_token_id
    assert again.eos_token_id == tok.eos_token_id
    assert chat_format.prompt_ids(again, dialog) == chat_format.prompt_ids(tok, dialog)
    assert chat_format.dialog_ids(again, dialog[:3])[-1] == chat_format.end_of_turn(tok)
