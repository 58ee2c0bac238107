"""`llama-ft chat`: talk to a tuned model in the Llama 2 chat format, one-shot or interactively.

MODEL may be a run folder (its base, quantised as it was trained unless --quantization says
otherwise, plus its adapter and tokenizer), a merged folder, or any Llama 2 checkpoint (local
folder or Hub id). Generation stops at EOS. The history is trimmed from the oldest turns so the
prompt and the answer fit Llama 2's 4096-token context; the system prompt always stays.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from ft import chat_format, models, runs
from ft.errors import UserError
from ft.recipe import ModelSection

CONTEXT = 4096
HELP = "commands: /system TEXT, /reset, /save FILE, /exit (Ctrl-C stops an answer, Ctrl-D exits)"


class Session:
    """A loaded model and tokenizer, and a dialog history."""

    def __init__(self, model, tokenizer, *, system: str | None, max_new_tokens: int, temperature: float, top_p: float):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.turns = system, []
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.context = min(getattr(model.config, "max_position_embeddings", CONTEXT), CONTEXT)

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def prompt_ids(self, user: str):
        """Token ids of the dialog so far plus `user`, dropping the oldest turns until it fits."""
        problem = chat_format.check_messages(self.messages(user), final_user=True)
        if problem:
            raise UserError(f"cannot send that message: {problem}")
        while True:
            ids = self.tokenizer.apply_chat_template(self.messages(user), return_tensors="pt", return_dict=True)["input_ids"]
            if ids.shape[1] + self.max_new_tokens <= self.context or not self.turns:
                break
            self.turns = self.turns[2:]  # the oldest user/assistant pair
        if ids.shape[1] + self.max_new_tokens > self.context:
            raise UserError(f"the message is too long: {ids.shape[1]} tokens + {self.max_new_tokens} to generate "
                            f"exceed the {self.context}-token context")
        return ids

    def answer(self, user: str, *, stream=None) -> tuple[str, int, float]:
        """Generate an answer (streamed to `stream` if given); returns text, new tokens, seconds."""
        import torch
        from transformers import TextIteratorStreamer

        ids = self.prompt_ids(user).to(self.model.device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                      eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        started = time.perf_counter()
        if stream is None:
            with torch.no_grad():
                out = self.model.generate(**kwargs)[0, ids.shape[1]:]
            text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
            new_tokens = len(out)
        else:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            stop = threading.Event()
            worker = threading.Thread(target=_generate, args=(self.model, kwargs, streamer, stop), daemon=True)
            worker.start()
            pieces = []
            try:
                for piece in streamer:
                    pieces.append(piece)
                    stream.write(piece if len(pieces) > 1 else piece.lstrip())
                    stream.flush()
            except KeyboardInterrupt:  # Ctrl-C: stop this answer, keep the session
                stop.set()
                worker.join()
                stream.write(" [stopped]\n")
                raise
            worker.join()
            stream.write("\n")
            text = "".join(pieces).strip()
            new_tokens = len(self.tokenizer.encode(text, add_special_tokens=False)) + 1
        seconds = time.perf_counter() - started
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text, new_tokens, seconds


def _generate(model, kwargs, streamer, stop) -> None:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return stop.is_set()

    with torch.no_grad():
        model.generate(**kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([Stop()]))


def load(model: str, *, adapter: str | None = None, quantization: str | None = None):
    """(model, tokenizer) for a run folder, a merged folder, a checkpoint folder or a Hub id."""
    from peft import PeftModel

    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / runs.RECIPE_FILE).is_file() and (folder / "adapter_config.json").is_file():
        recipe = runs.read_recipe(folder)  # a run: its base as trained, plus its adapter
        if recipe.stage == "reward":
            raise UserError(f"{model} is a reward model: score answers with `llama-ft score {model}`")
        if adapter:
            raise UserError(f"{model} is a run folder with its own adapter; --adapter applies to a plain model")
        base_section, adapter, tokenizer_source = recipe.model, str(folder), str(folder)
    elif folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"{model}: neither an llama-ft run folder (recipe.yaml + adapter) nor a model (config.json)")
    else:
        base_section = ModelSection(name=model, quantization="none")
        tokenizer_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there")
    if quantization:
        base_section = base_section.model_copy(update={"quantization": quantization})
    tokenizer = models.load_tokenizer(tokenizer_source, padding_side="left",
                                     trust_remote_code=base_section.trust_remote_code)
    net = models.load_model(base_section.model_copy(update={"adapter": None}))
    if adapter:
        try:
            net = PeftModel.from_pretrained(net, adapter)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"adapter {adapter} does not fit model {base_section.name!r}: {str(e).splitlines()[0][:300]}") from None
    net.eval()
    return net, tokenizer


def one_shot(session: Session, prompt: str, out=sys.stdout) -> str:
    text, _, _ = session.answer(prompt)
    out.write(text + "\n")
    return text


def interactive(session: Session, inp=sys.stdin, out=sys.stdout, err=sys.stderr) -> None:
    tty = inp.isatty()
    err.write(HELP + "\n")
    while True:
        if tty:
            out.write("\nyou> ")
            out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:  # Ctrl-D / end of input
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        command, _, rest = line.partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            session.turns = []
            err.write("(history cleared)\n")
            continue
        if command == "/system":
            session.system, session.turns = rest.strip() or None, []
            err.write(f"(system prompt {'set' if session.system else 'removed'}; history cleared)\n")
            continue
        if command == "/save":
            if not rest.strip():
                err.write("usage: /save FILE\n")
                continue
            head = [{"role": "system", "content": session.system}] if session.system else []
            Path(rest.strip()).expanduser().write_text(json.dumps(head + session.turns, indent=2, ensure_ascii=False) + "\n")
            err.write(f"(saved {len(head + session.turns)} messages to {rest.strip()})\n")
            continue
        if command.startswith("/"):
            err.write(f"unknown command {command}; {HELP}\n")
            continue
        out.write("assistant> " if tty else "")
        try:
            _, tokens, seconds = session.answer(line, stream=out)
        except KeyboardInterrupt:
            continue
        except UserError as e:
            err.write(f"error: {e}\n")
            continue
        err.write(f"({tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s)\n")
