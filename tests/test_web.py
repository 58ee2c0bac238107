"""The web pages in a real browser: `llama-ft chat --web` and `llama-ft annotate`, served by the CLI as a user starts
them and driven in headless Chromium (Debian's chromium + chromium-driver) through Selenium, with every host name
but 127.0.0.1 unresolvable: the pages must load and work with no network, and the test checks that every request
they made went to the page's own server. LLAMA_FT_SCREENSHOTS=DIR saves a screenshot of each page there
(scripts/web_screenshots.sh writes docs/images/)."""

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import cli, ROOT, TINY

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SECRET = "hf_never_on_the_page_0123456789"
browser_available = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


class Server:
    """`python cli.py ARGS --port P` in the background, until it prints the page's address."""

    def __init__(self, *args, env=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args), "--port", str(port)],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.output = []
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("page: "):
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(self.output)[-3000:])
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1250",
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # offline but for the page
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False,  # and a second one too:
                                              "profile.default_content_setting_values.automatic_downloads": 1})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # the given driver: nothing downloaded
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait_for(condition, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def by_css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def requests_elsewhere(driver, url: str) -> list[str]:
    """The URLs the page asked for that are not on its own server."""
    urls = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in urls if m["method"] == "Network.requestWillBeSent"]
    return [u for u in urls if not u.startswith((url.rstrip("/"), "data:", "blob:"))]


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("LLAMA_FT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(Path(folder) / name))


def type_into(driver, selector: str, text: str) -> None:
    box = wait_for(lambda: by_css(driver, selector), f"the page's {selector}", timeout=60)[0]
    box.clear()
    box.send_keys(text)


def download(driver, button: str) -> Path:
    """Click `button` and return the file the browser saved."""
    for old in driver.downloads.iterdir():
        old.unlink()
    by_css(driver, button)[0].click()
    return wait_for(lambda: [p for p in driver.downloads.glob("*.json")] if not list(driver.downloads.glob("*.crdownload"))
                    else None, "the downloaded file", timeout=30)[0]


@browser_available
def test_chat_page_answers_as_the_terminal_does(trained_run, browser):
    run, _ = trained_run
    question, system = "What color is the sky?", "You are a terse assistant."
    one_shot = [sys.executable, str(ROOT / "cli.py"), "chat", str(run), "--prompt", question, "--temperature", "0",
                "--max-new-tokens", "40"]
    terminal = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for command in (one_shot, one_shot + ["--system", system])]  # while the page's server loads
    server = Server("chat", run, "--web", "--temperature", "0", "--max-new-tokens", "40", env={"HF_TOKEN": SECRET})
    try:
        (plain, plain_err), (terse, terse_err) = (p.communicate(timeout=300) for p in terminal)
        assert terminal[0].returncode == terminal[1].returncode == 0, plain_err[-2000:] + terse_err[-2000:]
        plain, terse = plain.strip(), terse.strip()
        assert plain != terse  # the system message changes this model's greedy answer

        browser.get(server.url)

        def ask(text, answers):
            type_into(browser, "#message textarea", text)
            by_css(browser, "#send")[0].click()
            wait_for(lambda: len(by_css(browser, '[data-testid="bot"]')) == answers
                     and "tokens/s" in by_css(browser, "#status")[0].text, "the answer")
            return by_css(browser, '[data-testid="bot"]')[-1].text.strip()

        assert ask(question, 1) == plain  # the page's greedy answer is the terminal's
        assert json.loads(download(browser, "#download").read_text()) == [
            {"role": "user", "content": question}, {"role": "assistant", "content": plain}]

        by_css(browser, "#clear")[0].click()  # = /reset
        wait_for(lambda: not by_css(browser, '[data-testid="bot"]') and "cleared" in by_css(browser, "#status")[0].text,
                 "the cleared dialog")
        type_into(browser, "#system textarea", system)
        assert ask(question, 1) == terse
        screenshot(browser, "chat-web.png")
        assert json.loads(download(browser, "#download").read_text()) == [
            {"role": "system", "content": system}, {"role": "user", "content": question},
            {"role": "assistant", "content": terse}]  # the history before the clear is gone

        assert requests_elsewhere(browser, server.url) == []  # no CDN font or script: the page works offline
        for path in ("", "config"):
            with urllib.request.urlopen(server.url + path) as response:
                assert SECRET not in response.read().decode()
        assert SECRET not in browser.page_source
    finally:
        server.close()


@browser_available
def test_annotate_page_saves_rows_reward_trains_on(trained_run, browser, tmp_path):
    run, _ = trained_run
    prefs = tmp_path / "prefs.jsonl"
    server = Server("annotate", run, "--against", "builtin:tiny-llama-2", "--output", prefs, "--temperature", "0",
                    "--max-new-tokens", "24")
    turns = [("What is the opposite of up?", "The opposite of up is down."),  # what the trained run answers;
             ("And the opposite of that?", "The opposite of down is up.")]     # the untrained tiny model rambles
    shown = []
    try:
        browser.get(server.url)
        from selenium.webdriver.common.by import By

        for number, (question, right) in enumerate(turns):
            type_into(browser, "#prompt textarea", question)
            by_css(browser, "#ask")[0].click()
            wait_for(lambda: "which answer is better" in by_css(browser, "#status")[0].text, "the two answers")
            a, b = (by_css(browser, f"#answer-{s} textarea")[0].get_attribute("value") for s in "ab")
            assert right in (a, b) and a != b and a and b
            side = "A" if a == right else "B"
            shown.append({"A": a, "B": b, "side": side})
            browser.find_element(By.XPATH, "//*[@id='strength']//label[normalize-space()='significantly better']").click()
            browser.find_element(By.XPATH, "//*[@id='safety']//label[normalize-space()='both answers are safe']").click()
            if number == 0:
                screenshot(browser, "annotate.png")
            by_css(browser, f"#{side.lower()}-better")[0].click()
            wait_for(lambda: f"row {number + 1} of" in by_css(browser, "#status")[0].text, "the saved row")
        os.kill(server.proc.pid, signal.SIGKILL)  # right after the page said saved: the row must be on disk
        server.proc.wait(timeout=30)
        assert requests_elsewhere(browser, server.url) == []
    finally:
        server.close()

    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert len(rows) == 2
    for row, (question, right), seen in zip(rows, turns, shown):
        wrong = seen["B" if seen["side"] == "A" else "A"]
        assert (row["chosen"], row["rejected"], row["strength"]) == (right, wrong, "significantly_better")
        assert row["safety_label"] == "both_safe" and row["chosen_side"] == seen["side"]
        assert row["sides"][seen["side"]] == {"model": str(run), "temperature": 0.0}  # the side it was shown on
        assert row["chosen_model"] == str(run) and row["rejected_model"] == "builtin:tiny-llama-2"
        assert row["prompt"][-1] == {"role": "user", "content": question}
    assert rows[1]["prompt"] == [{"role": "user", "content": turns[0][0]},
                                 {"role": "assistant", "content": turns[0][1]},  # the first turn's chosen answer
                                 {"role": "user", "content": turns[1][0]}]

    result = cli("reward", "recipes/reward-helpful.yaml", "--output-dir", tmp_path / "rm", *TINY,
                     "--set", f"data.train={prefs}", "--set", "data.eval=null", "--set", "train.max_steps=2",
                     "--set", "train.batch_size=2", "--set", "train.save_steps=100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 pairs read" in result.stderr + result.stdout or "2 rows read" in result.stderr + result.stdout


@pytest.mark.parametrize("args", [["chat", "builtin:tiny-llama-2", "--web", "--share"],
                                  ["annotate", "builtin:tiny-llama-2", "--output", "x.jsonl", "--host", "0.0.0.0"]])
def test_a_page_others_can_reach_needs_a_password(args, tmp_path):
    result = cli(*args, cwd=tmp_path, env={"LLAMA_FT_WEB_AUTH": ""})
    assert result.returncode == 2 and "--auth USER:PASS" in result.stderr and "--no-auth" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.jsonl").exists()
    bad = cli(*args, cwd=tmp_path, env={"LLAMA_FT_WEB_AUTH": "no-colon"})
    assert bad.returncode == 2 and "expected USER:PASS" in bad.stderr


def test_annotate_refuses_an_output_that_is_not_jsonl(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "truncated\n')
    result = cli("annotate", "builtin:tiny-llama-2", "--output", prefs)
    assert result.returncode == 2 and f"{prefs}:2: not valid JSON" in result.stderr
    assert prefs.read_text().endswith('"truncated\n')  # left as it was


def test_sides_are_drawn_per_comparison_and_rows_append(tokenizer, tmp_path):
    from ft import annotate, data
    from ft.chat import Session

    class Config:
        max_position_embeddings = 4096

    class NoModel:  # compare and choose read no weights
        config = Config()

    def variant(name, temperature):
        return annotate.Variant(name, Session(NoModel(), tokenizer, system=None, max_new_tokens=8,
                                              temperature=temperature, top_p=0.9))

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "kept", "chosen": "x", "rejected": "y"}')  # someone's row, no final newline
    annotator = annotate.Annotator((variant("sft", 0.7), variant("sft", 1.0)), annotate.RowWriter(prefs),
                                   system="Be kind.", rng=random.Random(0))
    placements = set()
    for i in range(12):
        dialog = annotator.new_dialog()
        comparison = annotator.compare(dialog, f"question {i}")
        comparison.answers = {s: f"answer at {v.temperature}" for s, v in comparison.sides.items()}
        placements.add(comparison.sides["A"].temperature)
        row, count = annotator.choose(dialog, "B", "better", "chosen_safe")
        assert row["chosen"] == f"answer at {comparison.sides['B'].temperature}" and row["chosen_side"] == "B"
        assert row["chosen_temperature"] == row["sides"]["B"]["temperature"] != row["rejected_temperature"]
        assert row["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"question {i}"}]
        assert count == i + 2 and dialog.turns[-1]["content"] == row["chosen"]
    assert placements == {0.7, 1.0}  # both variants were shown on side A
    lines = prefs.read_text().splitlines()
    assert json.loads(lines[0])["prompt"] == "kept" and len(lines) == 13  # appended, never truncated
    assert all(data.to_pair(json.loads(line))["strength"] == "better" for line in lines[1:])
    with pytest.raises(Exception, match="how much better"):
        dialog = annotator.new_dialog()
        annotator.compare(dialog, "q").answers = {"A": "a", "B": "b"}
        annotator.choose(dialog, "A", None, "both_safe")


def test_the_stop_event_ends_an_answer_and_keeps_the_dialog(tiny_dir):
    """The page's stop button sets Session.stop, as Ctrl-C does: the untrained model's 3000-token ramble ends at once,
    is marked stopped, and stays in the dialog."""
    from ft import chat

    net, tokenizer = chat.load("builtin:tiny-llama-2")
    session = chat.Session(net, tokenizer, system=None, max_new_tokens=3000, temperature=0, top_p=1)
    pieces = []
    for piece in session.stream("Tell me everything."):
        pieces.append(piece)
        session.stop.set()  # as the button does, from the page's thread, while the answer streams
    answer = session.last
    assert answer.stopped and 1 <= answer.tokens < 3000
    assert session.turns[-1] == {"role": "assistant", "content": answer.text} and answer.text
    session.stop.clear()
    session.max_new_tokens = 5
    assert not session.answer("Again.").stopped and len(session.turns) == 4  # the session goes on


def test_a_reset_during_an_answer_stops_it_and_keeps_nothing(tiny_dir):
    """/reset (the page's clear) while an answer streams: the answer stops, and the cleared dialog stays empty."""
    from ft import chat

    net, tokenizer = chat.load("builtin:tiny-llama-2")
    session = chat.Session(net, tokenizer, system=None, max_new_tokens=3000, temperature=0, top_p=1)
    session.max_new_tokens = 3
    session.answer("First.")
    session.max_new_tokens = 3000
    for _ in session.stream("Tell me everything."):
        session.reset()  # as the clear button does, from the page's thread, while the answer streams
    assert session.last.stopped and session.last.tokens < 3000 and session.turns == []
    session.stop.clear()
    session.max_new_tokens = 3
    session.answer("Again.")
    assert [m["content"] for m in session.turns][0] == "Again."  # the session goes on from the cleared dialog


@pytest.fixture(scope="module")
def rambling_page(tiny_dir):
    """The chat page of the untrained tiny model, which rambles for 3000 tokens unless stopped, served in this
    process (ft.web.chat, as `llama-ft chat --web` serves it)."""
    pytest.importorskip("gradio")
    from ft import web

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = web.chat("builtin:tiny-llama-2", max_new_tokens=3000, temperature=0, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    page.close()


def _send(driver, text):
    type_into(driver, "#message textarea", text)
    by_css(driver, "#send")[0].click()


def _status(driver):
    found = by_css(driver, "#status")
    return found[0].text if found else ""


@browser_available
@pytest.mark.slow
def test_a_stop_pressed_while_the_request_waits_in_the_queue_is_kept(rambling_page, browser):
    """Tab 2 sends while tab 1's answer holds the queue, and presses stop while it waits: when its turn comes, it
    generates nothing (before: the stop was forgotten and it rambled on)."""
    browser.get(rambling_page)
    first = browser.current_window_handle
    _send(browser, "Tell me everything.")
    wait_for(lambda: any(b.text.strip() for b in by_css(browser, '[data-testid="bot"]')), "tab 1's answer streaming")
    browser.switch_to.new_window("tab")
    try:
        browser.get(rambling_page)
        second = browser.current_window_handle
        _send(browser, "And you, tell me everything too.")
        time.sleep(1.0)  # its request is in the queue, behind tab 1's answer
        by_css(browser, "#stop")[0].click()
        browser.switch_to.window(first)
        by_css(browser, "#stop")[0].click()
        wait_for(lambda: "stopped after" in _status(browser), "tab 1's answer to stop")
        browser.switch_to.window(second)
        wait_for(lambda: "stopped after 0 tokens" in _status(browser), "tab 2's request to end without generating",
                 timeout=60)
        assert not by_css(browser, '[data-testid="bot"]')  # no answer, and its question is not kept either
    finally:
        browser.close()
        browser.switch_to.window(first)


@browser_available
def test_clearing_during_an_answer_keeps_nothing_of_it(rambling_page, browser):
    """Clear while the answer streams: the dialog is empty and stays empty when the generation ends, and the
    transcript is empty (before: the answer came back into the cleared dialog)."""
    browser.get(rambling_page)
    _send(browser, "Tell me everything.")
    wait_for(lambda: any(b.text.strip() for b in by_css(browser, '[data-testid="bot"]')), "the answer streaming")
    by_css(browser, "#clear")[0].click()
    wait_for(lambda: "cleared" in _status(browser) and not by_css(browser, '[data-testid="bot"]'), "the cleared dialog")
    time.sleep(2.0)  # the generation's last pieces and its end have reached the page
    assert not by_css(browser, '[data-testid="bot"]') and "cleared" in _status(browser)
    assert json.loads(download(browser, "#download").read_text()) == []
    assert requests_elsewhere(browser, rambling_page) == []  # (and the browser's request log is read for the next test)


@pytest.mark.skipif(any(importlib.util.find_spec(name) is None for name in ("llama_cpp", "sse_starlette", "openai")),
                    reason="needs llama-cpp-python[server] and openai (CI builds and installs them: "
                           ".ci/llama_cpp_wheel.sh; docs/contributing.md)")
def test_llama_cpp_server_answers_as_llama_ft_chat(merged):
    """The merged GGUF served by llama.cpp's OpenAI-compatible server (llama-cpp-python[server]), asked with the
    official openai client: the chat template inside the GGUF gives the greedy answer `llama-ft chat` gives."""
    import openai

    _, out = merged
    question = "What does a duck say?"
    expected = cli("chat", out, "--prompt", question, "--temperature", "0", "--max-new-tokens", "40")
    assert expected.returncode == 0, expected.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(out / "model-f16.gguf"),
                               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)

        def up():
            if server.poll() is not None:
                raise AssertionError("the llama.cpp server exited:\n" + server.stderr.read()[-3000:])
            try:
                return client.models.list()
            except openai.APIConnectionError:
                return None

        wait_for(up, "the llama.cpp server", timeout=120)
        reply = client.chat.completions.create(model="merged", messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=40)
        assert reply.choices[0].message.content.strip() == expected.stdout.strip()
    finally:
        server.terminate()
        server.wait(timeout=60)
