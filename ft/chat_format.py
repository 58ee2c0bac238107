"""The Llama 2 chat format: one Jinja template, used for training, chat and export.

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

from ft.errors import UserError

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


def check_messages(messages: object, *, final_user: bool = False) -> str | None:
    """Why `messages` is not a valid Llama 2 dialog, or None if it is.

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
        for tag in TAGS:
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
