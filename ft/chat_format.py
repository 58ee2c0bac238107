"""The chat format: Llama 2's exact one, or the checkpoint's own template; the one owner of prompts, answers and
their loss masks.

`model.chat_format` (recipe key; `use`): `llama2` is Meta's format below, with Meta's ids; `model` is the
checkpoint's own `chat_template` (refused if it has none); `auto` (the default) picks `llama2` for a checkpoint with
no template or with a Llama 2 `[INST]`/`<<SYS>>` template (Llama-2-*-chat-hf), and the checkpoint's own otherwise.
A run saves its tokenizer with the template it trained with, so `auto` on a run folder gives that template back.

Every caller renders through this module: `prompt_ids` (a dialog ending with the user turn, plus the template's
generation prompt), `encode` (a training dialog: ids and the loss mask), `dialog_ids` (what a reward model reads).
The loss mask of ANY template, also one without `{% generation %}` markers (most published templates): each answer
is the tokens from the end of the generation prompt that precedes it to the template's end-of-turn token, inclusive
(`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `</s>` for Zephyr): not the role header, not the newline after
the end-of-turn. Found on token ids: the rendering of the dialog up to turn i with the generation prompt must be a
prefix of the whole dialog's rendering; a template for which it is not is refused. The end-of-turn token is read
from the template itself (the first special token after the answer of a rendered probe dialog).

The Llama 2 format:

Meta's reference (llama/generation.py, `chat_completion`) builds token ids like this:
  * a leading system message is folded into the first user message:
    "<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n" + user
  * every completed (user, assistant) pair is encoded on its own as
    BOS + sp.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + EOS
  * a final user message (the one to answer) is BOS + sp.encode(f"[INST] {user.strip()} [/INST]")
  * dialogs whose messages contain the tags themselves are refused.

TEMPLATE renders exactly that string, with `{% generation %}` around each answer and its
EOS, so `apply_chat_template(..., return_assistant_tokens_mask=True)` marks the tokens the
loss is computed on (answers and their EOS: the model learns to stop). Encoding the rendered
string gives Meta's ids only if the tokenizer prepends SentencePiece's dummy-prefix space to
the text after each special token, as Llama 2's original tokenizer does; `verify` checks
that on a probe dialog whenever a tokenizer is loaded.
"""

from __future__ import annotations

import weakref

from ft.errors import UserError

FORMATS = ("auto", "llama2", "model")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Llama 2 chat: after an optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif -%}"
    "{%- for tag in ['[INST]', '[/INST]', '<<SYS>>', '<</SYS>>'] -%}"
    "{%- if tag in message['content'] -%}"
    "{{ raise_exception('Llama 2 chat: messages may not contain the format tag ' + tag) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content -%}"
    "{%- endif -%}"
    "{{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}"
    "{%- else -%}"
    "{%- generation -%}{{- ' ' + message['content'] | trim + ' ' + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


class DialogError(ValueError):
    """A dialog the chosen format cannot take (the message says why; the caller adds its file and row)."""


def check_messages(messages: object, *, final_user: bool = False, tags: bool = True) -> str | None:
    """Why `messages` is not a valid dialog, or None if it is: an optional system message, then user and assistant
    turns alternating; with `tags` (the Llama 2 format), no message may contain Llama 2's format tags.

    A training dialog ends with an assistant answer; a prompt (final_user=True) ends with the
    user message to answer.
    """
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i + 1}: expected an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i + 1}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i + 1}: content must be text, got {type(m['content']).__name__}"
        for tag in TAGS if tags else ():
            if tag in m["content"]:
                return f"message {i + 1}: contains the chat-format tag {tag!r}, which Llama 2 refuses"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        return "only a system message, no user message"
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            offset = len(messages) - len(turns)
            return f"message {i + 1 + offset}: expected role {expected!r}, got {m['role']!r} (roles must alternate user/assistant)"
        if expected == "assistant" and not m["content"].strip():
            return f"message {i + 1 + (len(messages) - len(turns))}: empty assistant answer"
    last = turns[-1]["role"]
    if final_user and last != "user":
        return "a prompt must end with a user message"
    if not final_user and last != "assistant":
        return "the dialog must end with an assistant answer"
    return None


def encode_reference(tokenizer, messages: list[dict]) -> list[int]:
    """Meta's reference algorithm, with `tokenizer.encode` standing in for sp.encode per segment."""
    if messages[0]["role"] == "system":
        first = {"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}
        messages = [first] + messages[2:]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for user, answer in zip(messages[::2], messages[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += [bos] + tokenizer.encode(text, add_special_tokens=False) + [eos]
    if len(messages) % 2:
        ids += [bos] + tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", add_special_tokens=False)
    return ids


PROBE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": " Hi there\n"},
    {"role": "assistant", "content": "Hello 42 "},
    {"role": "user", "content": "And now?"},
]


def apply(tokenizer) -> None:
    """Give `tokenizer` the Llama 2 template, make it (and its saved copies) encode like Meta's, and check."""
    tokenizer.chat_template = TEMPLATE
    if hasattr(tokenizer, "legacy"):
        # transformers' LlamaTokenizer drops the dummy-prefix space after special tokens unless legacy=True,
        # and does not save the flag by itself: record it so every reload of a saved tokenizer encodes the same.
        tokenizer.init_kwargs["legacy"] = True
    verify(tokenizer)


def verify(tokenizer) -> None:
    """Refuse a tokenizer on which the template does not give Meta's ids (checked on a probe dialog)."""
    rendered = tokenizer.apply_chat_template(PROBE, tokenize=True, return_dict=True)["input_ids"]
    if list(rendered) != encode_reference(tokenizer, PROBE):
        raise UserError(
            f"tokenizer {tokenizer.name_or_path!r}: the Llama 2 chat template does not reproduce Meta's token ids "
            "with this tokenizer (it must add SentencePiece's dummy prefix after <s>, as Llama 2's does)"
        )


# ---------------------------------------------------------------- choosing the format


def is_llama2_template(template) -> bool:
    """A Llama 2 chat template: ours, or Meta's own in Llama-2-*-chat-hf ([INST] with <<SYS>>)."""
    return isinstance(template, str) and B_INST in template and "<<SYS>>" in template


def is_llama2(tokenizer) -> bool:
    """Whether `tokenizer` speaks the Llama 2 format (this module's TEMPLATE, Meta's ids)."""
    return tokenizer.chat_template == TEMPLATE


def choose(tokenizer, requested: str, name: str) -> str:
    """`llama2` or `model`: what model.chat_format `requested` (auto, llama2, model) means for this tokenizer."""
    if requested not in FORMATS:
        raise UserError(f"model.chat_format {requested!r}: expected one of {', '.join(FORMATS)}")
    own = tokenizer.chat_template
    if requested == "model" and not isinstance(own, str):
        raise UserError(f"model {name!r}: model.chat_format is 'model' but its tokenizer has no chat_template of its "
                        "own; use chat_format: llama2 (or auto)")
    if requested == "auto":
        return "llama2" if not isinstance(own, str) or is_llama2_template(own) else "model"
    return requested


def use(tokenizer, requested: str = "auto", *, name: str) -> str:
    """Give `tokenizer` the chosen format and check it: Meta's ids for llama2; for the model's own template, that its
    prefixes are prefixes and its end-of-turn token is found. Returns the format used (llama2 or model).

    With the model's own template, the tokenizer's EOS becomes the end-of-turn token when they differ and the
    template does not use eos_token (as Meta's own Llama 3 Instruct configuration does), so that generation stops
    where a turn ends."""
    chosen = choose(tokenizer, requested, name)
    if chosen == "llama2":
        apply(tokenizer)
        return chosen
    eot = end_of_turn(tokenizer, name=name)
    if eot != tokenizer.eos_token_id and "eos_token" not in tokenizer.chat_template:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eot)
    for probe in PREFIX_PROBES:
        try:
            _render(tokenizer, probe)
        except DialogError:
            continue  # a template may refuse some dialogs (a system message, say): its rows are refused one by one
        try:
            encode(tokenizer, probe)
        except DialogError as e:
            raise UserError(f"model {name!r}: its chat template cannot be trained on ({e}); "
                            "use model.chat_format: llama2") from None
    return chosen


def describe(tokenizer) -> str:
    """The format in words, for reports: `llama2` or `model (end of turn <|im_end|>)`."""
    if is_llama2(tokenizer):
        return "llama2"
    return f"model (its own template; end of turn {tokenizer.convert_ids_to_tokens(end_of_turn(tokenizer))})"


# ---------------------------------------------------------------- rendering


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's raise_exception and template errors: the template refuses this dialog
        raise DialogError(f"the chat template cannot render it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return list(out["input_ids"])


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a dialog ending with the user turn to answer, with the template's generation prompt: what a model
    continues with its answer (chat, sampling, compare, evaluation)."""
    return _render(tokenizer, messages, generation_prompt=True)


def dialog_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a dialog ending with an answer, up to and including that answer's end-of-turn token (what a reward
    model reads; its score is taken at that last token)."""
    ids = _render(tokenizer, messages)
    eot = end_of_turn(tokenizer)
    last = len(ids) - 1 - ids[::-1].index(eot) if eot in ids else len(ids) - 1
    return ids[:last + 1]


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) of a training dialog: 1 on every answer token and its end-of-turn token.

    A template with `{% generation %}` markers (the Llama 2 format's) marks the answers itself; for any other the
    answers are found on ids (see the module docstring). DialogError if the template cannot render the dialog, a
    message contains the end-of-turn token's text, or a prefix rendering is not a prefix of the whole.
    """
    template = tokenizer.chat_template
    if isinstance(template, str) and "{% generation" in template.replace("{%-", "{%"):
        problem = check_messages(messages, tags=is_llama2(tokenizer))
        if problem:
            raise DialogError(problem)
        try:
            encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
        except Exception as e:
            raise DialogError(f"the chat template cannot render it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return list(encoded["input_ids"]), list(encoded["assistant_masks"])
    eot = end_of_turn(tokenizer)
    eot_text = tokenizer.convert_ids_to_tokens(eot)
    for i, m in enumerate(messages):
        if isinstance(m.get("content"), str) and eot_text in m["content"]:
            raise DialogError(f"message {i + 1}: contains the end-of-turn token {eot_text!r} of the chat template")
    ids = _render(tokenizer, messages)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        if ids[:len(prefix)] != prefix:
            raise DialogError(f"message {i + 1}: the chat template renders the dialog before this answer (with its "
                              "generation prompt) differently from the whole dialog, so the answer cannot be told apart")
        start = len(prefix)
        if eot not in ids[start:]:
            raise DialogError(f"message {i + 1}: no end-of-turn token {eot_text!r} after the answer")
        end = ids.index(eot, start)
        mask[start:end + 1] = [1] * (end + 1 - start)
    return ids, mask


# ---------------------------------------------------------------- the template's own tokens

EOT_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
PREFIX_PROBES = [
    EOT_PROBE,
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " Hi there\n"},
     {"role": "assistant", "content": "Hello 42 "}, {"role": "user", "content": "And now?"},
     {"role": "assistant", "content": "Fine.\nThanks"}],
]
_eot_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def special_ids(tokenizer) -> set[int]:
    """Every special token's id: the named ones and the added tokens marked special."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def end_of_turn(tokenizer, *, name: str | None = None) -> int:
    """The token that ends an assistant turn in this template: the first special token after the answer of a probe
    dialog (`</s>` in the Llama 2 format, `<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3's)."""
    template = tokenizer.chat_template
    cached = _eot_cache.get(tokenizer)
    if cached and cached[0] == template:
        return cached[1]
    try:
        start = len(_render(tokenizer, EOT_PROBE[:1], generation_prompt=True))
        full = _render(tokenizer, EOT_PROBE)
    except DialogError as e:
        raise UserError(f"model {name or tokenizer.name_or_path!r}: {e} (a probe dialog)") from None
    specials = special_ids(tokenizer)
    found = next((t for t in full[start:] if t in specials), None)
    if found is None:
        raise UserError(f"model {name or tokenizer.name_or_path!r}: its chat template ends an answer with no special "
                        "token, so the end of a turn cannot be learned; use model.chat_format: llama2")
    _eot_cache[tokenizer] = (template, found)
    return found


def template_ids(tokenizer) -> set[int]:
    """The special tokens the template uses: those in a rendered probe dialog (with a generation prompt), and those
    whose text appears in the template's source."""
    used: set[int] = set()
    for probe in PREFIX_PROBES:
        try:
            used |= set(_render(tokenizer, probe)) | set(_render(tokenizer, probe[:-1], generation_prompt=True))
        except DialogError:
            continue  # a dialog this template refuses (a system message, say)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    used |= {i for i in special_ids(tokenizer) if tokenizer.convert_ids_to_tokens(i) in template}
    return used & special_ids(tokenizer)
