"""The browser pages, Gradio views over ft.chat (`llama-ft chat --web`) and ft.annotate (`llama-ft annotate`).

The chat page is the terminal chat's Session in a page: one chat format, one history trimming, one generation
path; its stop button sets the same stop event as Ctrl-C. Each browser tab has its own dialog on the one loaded
model, and generations are queued one at a time (a second tab waits, never interleaves).

Safe by default: the pages bind 127.0.0.1; a page other machines can reach (--share, or a --host that is not
loopback) needs --auth USER:PASS (or LLAMA_FT_WEB_AUTH), or --no-auth given on purpose. Gradio's analytics are
off, the page loads no fonts or scripts from the network, and nothing it sends is executed (answers are shown as
sanitised Markdown). In a notebook (Colab) the launch returns and the page shows inline.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from pathlib import Path

from ft.errors import UserError

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import and at launch


def check_exposure(host: str, share: bool, auth: str | None, no_auth: bool) -> tuple[str, str] | None:
    """The (user, password) the page asks for, or None; refuses a page others can reach without one."""
    auth = auth or os.environ.get("LLAMA_FT_WEB_AUTH") or None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth / LLAMA_FT_WEB_AUTH: expected USER:PASS")
        return user, password
    exposed = "--share (a public link)" if share else None if _loopback(host) else f"--host {host}"
    if exposed and not no_auth:
        raise UserError(f"{exposed} lets other machines open the page, and anyone who can open it can use the model: "
                        "give --auth USER:PASS (or set LLAMA_FT_WEB_AUTH), or --no-auth to publish it without a "
                        "password on purpose")
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(blocks, *, host: str, port: int, share: bool, auth, block: bool = True, out=lambda m: print(m, flush=True)):
    """Serve `blocks` (one generation at a time) and print where; blocks unless `block` is False (a notebook)."""
    blocks.queue(default_concurrency_limit=1)
    # share is passed explicitly: left unset, gradio turns a public link on by itself in Colab
    _, local_url, share_url = blocks.launch(server_name=host, server_port=port, share=share, auth=auth,
                                            prevent_thread_lock=True, quiet=True, show_error=True, footer_links=[])
    out(f"page: {local_url}" + ("" if auth else " (no password)"))
    if share_url:
        out(f"public URL: {share_url}")
    if block:
        try:
            blocks.block_thread()
        finally:
            blocks.close()
    return blocks


def _transcript_file(folder: str, messages: list[dict]) -> str:
    path = Path(folder) / "transcript.json"
    path.write_text(json.dumps(messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return str(path)


def chat_page(session, *, title: str):
    """The chat page over `session` (its settings are the page's initial values; each tab gets a fork)."""
    import gradio as gr

    from ft.chat import speed

    folder = tempfile.mkdtemp(prefix="llama-ft-chat-")

    def new_tab():
        tab = session.fork()
        tab.folder = tempfile.mkdtemp(dir=folder)  # this tab's transcript file
        # a send waits in the queue (behind another tab's answer) while it is clicked but its submit has not started
        tab.sends_clicked = tab.sends_started = 0
        tab.stop_waiting = False  # stop was pressed while a send waited: that send answers nothing
        return tab

    def apply(tab, system, temperature, top_p, max_new_tokens) -> bool:
        """The controls into the session; True if the system message changed (which clears the dialog, as /system)."""
        tab.temperature, tab.top_p, tab.max_new_tokens = float(temperature), float(top_p), int(max_new_tokens)
        system = system.strip() or None
        if system != tab.system:
            tab.system, tab.turns = system, []
            return True
        return False

    def arm(tab):  # not queued: counts the send at its click, while its submit may still wait for the queue
        tab.sends_clicked += 1

    def submit(message, shown, tab, system, temperature, top_p, max_new_tokens):
        tab.sends_started += 1
        stop_waiting, tab.stop_waiting = tab.stop_waiting, False
        message = message.strip()
        if not message:
            yield "", shown, "", gr.update()
            return
        if apply(tab, system, temperature, top_p, max_new_tokens):
            shown = []
        tab.stop.clear()  # a stop of an earlier answer is over; one pressed while this send waited is kept
        if stop_waiting:
            tab.stop.set()  # Session.stream then generates nothing and keeps no turn
        resets = tab.resets
        shown = list(shown) + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        text = ""
        try:
            for piece in tab.stream(message):
                text += piece
                shown[-1] = {"role": "assistant", "content": text}
                yield "", shown, "", gr.update()
        except UserError as e:
            raise gr.Error(str(e))
        answer = tab.last
        if tab.resets != resets:  # cleared while it was generated: the answer went with the dialog it belonged to
            yield "", [], "(history cleared)", gr.update(value=_transcript_file(tab.folder, tab.transcript()))
            return
        shown[-1] = {"role": "assistant", "content": answer.text + (" [stopped]" if answer.stopped else "")}
        if not answer.text:  # stopped before its first word: the session kept no turn, nor does the page
            shown = shown[:-2]
        status = f"{'stopped after ' if answer.stopped else ''}{answer.tokens} tokens, {speed(answer)}"
        yield "", shown, status, gr.update(value=_transcript_file(tab.folder, tab.transcript()))

    def stop(tab):
        if tab.sends_clicked > tab.sends_started:  # a send waits in the queue: it must not answer when its turn comes
            tab.stop_waiting = True
        tab.stop.set()  # the one stop path: the generation ends at its next token and marks the answer stopped

    def clear(tab):  # = /reset: an answer under way is stopped and not kept
        tab.reset()
        return [], "(history cleared)", gr.update(value=_transcript_file(tab.folder, tab.transcript()))

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        tab = gr.State(new_tab)  # called per tab (a plain function: gr.State would deep-copy a value, model included)
        gr.Markdown(f"### {title}")
        with gr.Row():
            with gr.Column(scale=3):
                dialog = gr.Chatbot(label="dialog", height=420, elem_id="dialog", feedback_options=None,
                                    buttons=["copy", "copy_all"], allow_tags=False)  # no "share": it posts to Hugging Face
                message = gr.Textbox(label="message", placeholder="Write a message, then Enter", elem_id="message")
                with gr.Row():
                    send = gr.Button("send", variant="primary", elem_id="send")
                    stop_button = gr.Button("stop", elem_id="stop")
                    clear_button = gr.Button("clear", elem_id="clear")
                    download = gr.DownloadButton("download transcript (JSON)", elem_id="download")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=1):
                system = gr.Textbox(label="system message", value=session.system or "", lines=4, elem_id="system")
                temperature = gr.Slider(0, 2, value=session.temperature, step=0.05, label="temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0, 1, value=session.top_p, step=0.01, label="top-p", elem_id="top_p")
                max_new_tokens = gr.Slider(1, session.context, value=session.max_new_tokens, step=1,
                                           label="max new tokens", elem_id="max_new_tokens")
        inputs = [message, dialog, tab, system, temperature, top_p, max_new_tokens]
        outputs = [message, dialog, status, download]
        for event in (send.click, message.submit):  # two listeners each: the count at the click, the queued answer
            event(arm, [tab], None, queue=False)
            event(submit, inputs, outputs)
        stop_button.click(stop, [tab], None, queue=False)  # not queued: it must run while the answer holds the queue
        clear_button.click(clear, [tab], [dialog, status, download], queue=False)
        dialog.clear(clear, [tab], [dialog, status, download], queue=False)  # the dialog's own trash icon, the same
    return page


def annotate_page(annotator, *, title: str, on_close=None):
    """The annotation page: a prompt, answers A and B, strength and safety, A/B is better, new dialog. `on_close()`
    is called when a tab of it is closed (llama-ft pipeline stops waiting for rows then)."""
    import gradio as gr

    from ft.annotate import SAFETY_LABELS, STRENGTH_LABELS

    def ask(prompt, dialog):
        prompt = prompt.strip()
        if not prompt:
            raise gr.Error("write a prompt first")
        try:
            annotator.compare(dialog, prompt)
        except UserError as e:
            raise gr.Error(str(e))
        answers = {"A": "", "B": ""}
        for side in ("A", "B"):  # A first, whichever variant it is
            for piece in annotator.stream(dialog, side):
                answers[side] += piece
                yield gr.update(), answers["A"], answers["B"], "generating..."
        yield gr.update(), dialog.pending.answers["A"], dialog.pending.answers["B"], "which answer is better?"

    def choose(side, strength, safety, dialog):
        try:
            row, count = annotator.choose(dialog, side, strength, safety)
        except UserError as e:
            raise gr.Error(str(e))
        # the row is on disk (fsync) before the page moves on
        status = f"saved: {side} is {strength.replace('_', ' ')} (row {count} of {annotator.writer.path})"
        return _shown(dialog), "", "", "", None, None, status

    def new_dialog(system, dialog):
        annotator_dialog = annotator.new_dialog()
        annotator_dialog.system = system.strip() or None
        return annotator_dialog, [], "", "", "", "(new dialog)"

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        dialog = gr.State(lambda: annotator.new_dialog())  # a function: gr.State deep-copies anything else
        gr.Markdown(f"### {title}\nWrite a prompt, read both answers, choose the better one and how much better.")
        system = gr.Textbox(label="system message (applies from the next new dialog)", value=annotator.system or "",
                            elem_id="system")
        history = gr.Chatbot(label="dialog so far (carried by the chosen answers)", height=180, elem_id="history",
                             feedback_options=None, buttons=["copy"], allow_tags=False)
        prompt = gr.Textbox(label="prompt", elem_id="prompt", placeholder="Write the next user message")
        ask_button = gr.Button("get two answers", variant="primary", elem_id="ask")
        with gr.Row():
            answer_a = gr.Textbox(label="A", lines=6, interactive=False, elem_id="answer-a")
            answer_b = gr.Textbox(label="B", lines=6, interactive=False, elem_id="answer-b")
        strength = gr.Radio(list(STRENGTH_LABELS.items()), label="how much better", elem_id="strength")
        safety = gr.Radio(list(SAFETY_LABELS.items()), label="safety", elem_id="safety")
        with gr.Row():
            a_better = gr.Button("A is better", elem_id="a-better")
            b_better = gr.Button("B is better", elem_id="b-better")
            new = gr.Button("new dialog", elem_id="new-dialog")
        status = gr.Markdown("", elem_id="status")
        ask_button.click(ask, [prompt, dialog], [prompt, answer_a, answer_b, status])
        prompt.submit(ask, [prompt, dialog], [prompt, answer_a, answer_b, status])
        chosen_outputs = [history, prompt, answer_a, answer_b, strength, safety, status]
        # a choice needs no model: it does not wait behind another tab's generation (the writer's lock orders rows)
        a_better.click(lambda *a: choose("A", *a), [strength, safety, dialog], chosen_outputs, concurrency_limit=None)
        b_better.click(lambda *a: choose("B", *a), [strength, safety, dialog], chosen_outputs, concurrency_limit=None)
        new.click(new_dialog, [system, dialog], [dialog, history, prompt, answer_a, answer_b, status],
                  concurrency_limit=None)
        if on_close is not None:
            page.unload(on_close)
    return page


def _shown(dialog) -> list[dict]:
    return [dict(m) for m in dialog.turns]


def _in_notebook() -> bool:
    return "ipykernel" in __import__("sys").modules


def chat(model: str, *, adapter: str | None = None, quantization: str | None = None, system: str | None = None,
         max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9, host: str = "127.0.0.1",
         port: int = 7860, share: bool = False, auth: str | None = None, no_auth: bool = False, block: bool | None = None):
    """`llama-ft chat MODEL --web`: load MODEL and serve the chat page. In a notebook it returns the running page
    (shown inline); elsewhere it serves until Ctrl-C."""
    from ft import chat as chat_mod

    credentials = check_exposure(host, share, auth, no_auth)  # before minutes of loading
    net, tokenizer = chat_mod.load(model, adapter=adapter, quantization=quantization)
    session = chat_mod.Session(net, tokenizer, system=system, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p)
    page = chat_page(session, title=f"llama-ft chat: {model}")
    return launch(page, host=host, port=port, share=share, auth=credentials,
                  block=not _in_notebook() if block is None else block)


def annotate(model: str, *, output: Path, against: str | None = None, temperature: float | None = None,
             temperatures: str | None = None, system: str | None = None, max_new_tokens: int = 512,
             quantization: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
             auth: str | None = None, no_auth: bool = False, block: bool | None = None):
    """`llama-ft annotate MODEL --output FILE.jsonl`: load the model(s) and serve the annotation page."""
    from ft.annotate import open_annotator

    credentials = check_exposure(host, share, auth, no_auth)
    annotator = open_annotator(model, against=against, output=Path(output), temperature=temperature,
                               temperatures_pair=temperatures, system=system, max_new_tokens=max_new_tokens,
                               quantization=quantization)
    vs = f"{model} vs {against}" if against else f"{model} at temperatures {annotator.variants[0].temperature} and " \
                                                 f"{annotator.variants[1].temperature}"
    page = annotate_page(annotator, title=f"llama-ft annotate: {vs}, rows to {output}")
    return launch(page, host=host, port=port, share=share, auth=credentials,
                  block=not _in_notebook() if block is None else block)
