"""`llama-ft chat`: talk to a tuned model in the Llama 2 chat format, one-shot or interactively.

MODEL may be a run folder (its base, quantised as it was trained unless --quantization says
otherwise, plus its adapter and tokenizer), a merged folder, or any Llama 2 checkpoint (local
folder or Hub id). Generation stops at EOS, or early through Session.stop (Ctrl-C in the terminal,
the stop button of `llama-ft chat --web`, ft/web.py). The history is trimmed from the oldest turns so the
prompt and the answer fit Llama 2's 4096-token context; the system prompt always stays.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ft import chat_format, models, runs
from ft.errors import UserError
from ft.recipe import ModelSection

CONTEXT = 4096
POLL_SECONDS = 0.1  # how long the waiting thread sleeps at most before it looks at a pending Ctrl-C
HELP = "commands: /system TEXT, /reset, /save FILE, /exit (Ctrl-C stops an answer, Ctrl-D exits)"


@dataclass
class Answer:
    """One generated answer: its text, tokens generated (EOS included), seconds, and whether the stop cut it."""

    text: str
    tokens: int
    seconds: float
    stopped: bool


class Session:
    """A loaded model and tokenizer, and a dialog history; the terminal chat and the web page are views of it.

    `stop` is the one way to end an answer early: Ctrl-C in the terminal and the page's stop button set it, the
    generation checks it before every new token, and an answer is marked stopped only when it was cut by it.
    """

    def __init__(self, model, tokenizer, *, system: str | None, max_new_tokens: int, temperature: float, top_p: float):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.turns = system, []
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.context = min(getattr(model.config, "max_position_embeddings", CONTEXT), CONTEXT)
        self.stop = threading.Event()
        self.last: Answer | None = None
        self.resets = 0  # how many times the dialog was cleared (reset): an answer begun before a reset is not kept
        self.generating = False

    def reset(self) -> None:
        """Clear the dialog (/reset, the page's clear button). An answer being generated is stopped, and not kept: it
        belonged to the dialog that was cleared."""
        self.turns = []
        self.resets += 1
        if self.generating:
            self.stop.set()

    def fork(self) -> "Session":
        """A new dialog on the same loaded model (one per browser tab), with this session's settings."""
        return Session(self.model, self.tokenizer, system=self.system, max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature, top_p=self.top_p)

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def transcript(self) -> list[dict]:
        """The dialog so far as messages, system first: what /save writes and the page downloads."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

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

    def stream(self, user: str) -> Iterator[str]:
        """Generate the answer to `user`, yielding its text in pieces as they come. When it ends (EOS, the token
        limit, or `stop`), the turn is in the history (a stopped answer as far as it got) and `last` is its Answer.

        The text kept is the decoded tokens, so a streamed, a one-shot and a page answer are the same text. The
        model runs in a worker thread; this thread only waits on it, a short while at a time, so that a Ctrl-C
        handler (which runs in the main thread only) runs at once even while no text arrives.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if self.stop.is_set():  # stopped before it began (the page's stop while the request waited): nothing generated
            self.last = Answer("", 0, 0.0, stopped=True)
            return
        resets = self.resets
        ids = self.prompt_ids(user).to(self.model.device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                      eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stop, abandoned, cut = self.stop, threading.Event(), threading.Event()

        class StopEvent(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                if stop.is_set() or abandoned.is_set():
                    cut.set()
                    return True
                return False

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=POLL_SECONDS)
        result: dict = {}

        def work():
            try:
                with torch.no_grad():
                    result["ids"] = self.model.generate(**kwargs, streamer=streamer,
                                                        stopping_criteria=StoppingCriteriaList([StopEvent()]))[0, ids.shape[1]:]
            except BaseException as e:  # re-raised in the caller's thread; the streamer must still end
                result["error"] = e
                streamer.end()

        started = time.perf_counter()
        worker = threading.Thread(target=work, daemon=True)
        self.generating = True
        worker.start()
        first = True
        try:
            while True:
                try:
                    piece = next(streamer)
                except queue.Empty:
                    continue
                except StopIteration:
                    break
                if first:
                    piece = piece.lstrip()
                if piece:
                    first = False
                    yield piece
        finally:
            abandoned.set()  # a consumer that gives up (a closed page, an error) ends the generation too
            worker.join()
            self.generating = False
        if "error" in result:
            raise result["error"]
        out = result["ids"]
        text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        self.last = Answer(text, len(out), time.perf_counter() - started, stopped=cut.is_set() and stop.is_set())
        # no turn for an answer stopped before its first word, or for one begun in a dialog that was cleared since
        if text and self.resets == resets:
            self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]

    def answer(self, user: str, *, stream=None) -> Answer:
        """Generate the answer to `user` (its pieces written to `stream` as they come, if given)."""
        for piece in self.stream(user):
            if stream is not None:
                stream.write(piece)
                stream.flush()
        if stream is not None:
            stream.write(" [stopped]\n" if self.last.stopped else "\n")
            stream.flush()
        return self.last


@contextmanager
def ctrl_c_stops(session: Session):
    """While inside, Ctrl-C (SIGINT) sets `session.stop` instead of raising KeyboardInterrupt wherever the main
    thread happens to be. Installed explicitly: a shell that starts a program in the background without job
    control (a script's `cmd &`, many CI runners) leaves SIGINT ignored, and Python keeps it ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: session.stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def load(model: str, *, adapter: str | None = None, quantization: str | None = None):
    """(model, tokenizer) for a run folder, a merged folder, a checkpoint folder or a Hub id."""
    folder = Path(model).expanduser()
    if runs.is_run(folder):
        recipe = runs.read_recipe(folder)  # a run: its base as trained, plus its adapter
        if not runs.is_chat_model(recipe):
            raise UserError(f"{model} is a reward model: score answers with `llama-ft score {model}`")
        if adapter:
            raise UserError(f"{model} is a run folder with its own adapter; --adapter applies to a plain model")
        base_section, adapter, tokenizer_source = recipe.model, str(folder), str(folder)
    elif folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"{model}: neither an llama-ft run folder (recipe.yaml + adapter) nor a model (config.json)")
    else:
        base_section = ModelSection(name=model, quantization="none")
        tokenizer_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model
    if adapter:
        runs.adapter_config(adapter, "--adapter")  # refused before any weights are loaded
    if quantization:
        base_section = base_section.model_copy(update={"quantization": quantization})
    tokenizer = models.load_tokenizer(tokenizer_source, padding_side="left",
                                     trust_remote_code=base_section.trust_remote_code)
    net = models.load_model(base_section.model_copy(update={"adapter": None}))
    if adapter:
        net = models.load_adapter(net, adapter, what="adapter")
    net.eval()
    return net, tokenizer


def one_shot(session: Session, prompt: str, out=None) -> str:
    text = session.answer(prompt).text
    (out or sys.stdout).write(text + "\n")  # sys.stdout as it is now (a notebook or a test may have replaced it)
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
            session.reset()
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
            messages = session.transcript()
            Path(rest.strip()).expanduser().write_text(json.dumps(messages, indent=2, ensure_ascii=False) + "\n")
            err.write(f"(saved {len(messages)} messages to {rest.strip()})\n")
            continue
        if command.startswith("/"):
            err.write(f"unknown command {command}; {HELP}\n")
            continue
        out.write("assistant> " if tty else "")
        session.stop.clear()
        try:
            with ctrl_c_stops(session):
                answer = session.answer(line, stream=out)
        except UserError as e:
            err.write(f"error: {e}\n")
            continue
        err.write(f"({'stopped after ' if answer.stopped else ''}{answer.tokens} tokens, {speed(answer)})\n")


def speed(answer: Answer) -> str:
    return f"{answer.tokens / max(answer.seconds, 1e-9):.1f} tokens/s"
