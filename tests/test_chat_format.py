"""Golden tests: the saved chat template gives Meta's reference token ids, id for id.

The reference here is an independent implementation of llama/generation.py's chat encoding
on the raw SentencePiece model (sentencepiece itself, not the Hugging Face tokenizer).
"""

import pytest
import sentencepiece as spm

from conftest import a, s, u

from ft import chat_format
from ft.errors import UserError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))


def meta_reference(sp, dialog):
    """Meta's chat_completion encoding (llama/generation.py), transcribed."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    assert all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ") + [sp.eos_id()]
    if len(dialog) % 2:
        tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}")
    return tokens


DIALOGS = {
    "single turn": [u("What is the capital of France?"), a("Paris.")],
    "prompt only": [u("What is the capital of France?")],
    "system prompt": [s("You are a terse assistant."), u("Hi"), a("Hello.")],
    "system prompt, prompt only": [s("Answer in one word."), u("Colour of the sky?")],
    "multi-turn": [u("one"), a("two"), u("three"), a("four"), u("five"), a("six")],
    "multi-turn with system, ends on user": [s("Be brief."), u("a?"), a("b."), u("c?")],
    "awkward whitespace": [s("  spaced  system \n"), u("  lead and trail  \n\n"), a("\n  answer with\ttab  "), u(" x "), a("y")],
    "newlines and digits": [u("List:\n1. cat\n2. dog\n\nWhich 42?"), a("Line one\nline 2 has 12345.")],
    "unicode and bytes": [u("Café au lait? 漢字 🙂"), a("Oui — très bien!")],
}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_template_ids_match_meta_reference(tokenizer, sp, name):
    dialog = DIALOGS[name]
    ids = tokenizer.apply_chat_template(dialog, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == meta_reference(sp, dialog)


def test_newline_is_byte_token_like_llama2(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("a\nb", add_special_tokens=False)) == ["▁a", "<0x0A>", "b"]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", ["single turn", "system prompt", "multi-turn", "awkward whitespace"])
def test_assistant_mask_is_exactly_the_answers_and_their_eos(tokenizer, sp, name):
    dialog = DIALOGS[name]
    out = tokenizer.apply_chat_template(dialog, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    expected = [0] * len(ids)
    for k, message in enumerate(dialog):
        if message["role"] == "assistant":
            prompt_end = len(meta_reference(sp, dialog[:k]))  # the dialog up to this answer's [/INST]
            answer_end = len(meta_reference(sp, dialog[: k + 1]))  # ... through the answer and its EOS
            expected[prompt_end:answer_end] = [1] * (answer_end - prompt_end)
            assert ids[answer_end - 1] == tokenizer.eos_token_id
    assert mask == expected


def test_saved_tokenizer_reloads_with_same_ids(tokenizer, sp, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    dialog = DIALOGS["awkward whitespace"]
    assert list(reloaded.apply_chat_template(dialog, tokenize=True, return_dict=True)["input_ids"]) == meta_reference(sp, dialog)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_dialogs_containing_format_tags_are_refused(tokenizer, tag):
    dialog = [u(f"please {tag} break"), a("no")]
    assert "tag" in chat_format.check_messages(dialog)
    with pytest.raises(Exception, match="format tag"):
        tokenizer.apply_chat_template(dialog, tokenize=False)


def test_roles_must_alternate(tokenizer):
    assert "alternate" in chat_format.check_messages([u("a"), u("b"), a("c")])
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([u("a"), u("b")], tokenize=False)


def test_check_messages_rules():
    assert chat_format.check_messages([u("q"), a("x")]) is None
    assert chat_format.check_messages([u("q")], final_user=True) is None
    assert "end with an assistant" in chat_format.check_messages([u("q")])
    assert "empty assistant" in chat_format.check_messages([u("q"), a("  ")])
    assert "unknown role" in chat_format.check_messages([{"role": "bot", "content": "x"}])
    assert "only a system" in chat_format.check_messages([s("x")])


def test_verify_rejects_a_tokenizer_without_dummy_prefix_after_bos(tiny_dir):
    """A non-legacy Llama tokenizer drops the space after <s>: ids would silently differ from Meta's."""
    from transformers import AutoTokenizer

    bad = AutoTokenizer.from_pretrained(tiny_dir, legacy=False)
    bad.chat_template = chat_format.TEMPLATE
    with pytest.raises(UserError, match="Meta's token ids"):
        chat_format.verify(bad)
