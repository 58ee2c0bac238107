"""`llama-ft pipeline`: the Llama 2-Chat loop (SFT, then rounds of preferences, reward models, rejection sampling /
PPO, each measured) on the built-in tiny model with recipes/tiny-pipeline.yaml and its rule judge, which scores an
answer 1 when it holds the word the question was taught with (recipes/tiny_pipeline_judge.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import ft
from conftest import ROOT, cli, run_cli, shared
from test_web import browser, browser_available  # noqa: F401 (the headless Chromium fixture)
from ft import pipeline, pipeline_recipe, plan
from ft import recipe as recipe_mod
from ft.errors import UserError

TINY = ROOT / "recipes" / "tiny-pipeline.yaml"
LLAMA2 = ROOT / "recipes" / "llama2-chat.yaml"
SLOW = pytest.mark.slow


# ---------------------------------------------------------------- the recipe


def test_the_shipped_pipeline_recipes_load_and_every_stage_recipe_they_make_is_valid():
    tiny = pipeline_recipe.load(TINY)
    assert tiny.rounds == 2 and pipeline_recipe.stages(tiny, 2) == [
        "prefs", "reward-helpful", "rejection", "compare-sft", "compare-prev"]
    made = pipeline_recipe.stage_recipes(tiny, "tiny")
    assert made[(1, "rejection")].rejection.reward_model.endswith("round-1/reward-helpful")
    assert made[(2, "rejection")].model.adapter.endswith("round-1/rejection/sft")  # round 2 starts from round 1
    assert [s.path for s in made[(2, "reward-helpful")].data.train] == [
        str(Path(tiny.output_dir) / f"round-{k}" / "pairs-helpful-train.jsonl") for k in (1, 2)]  # rounds 1..k
    llama = pipeline_recipe.load(LLAMA2)
    assert [llama.method(k) for k in (1, 2, 3, 4)] == ["rejection", "rejection", "rejection+ppo", "rejection+ppo"]
    stages = pipeline_recipe.stage_recipes(llama, "llama2")
    assert stages[(3, "ppo")].model.adapter.endswith("round-3/rejection/sft")  # PPO on the rejection model
    assert stages[(3, "ppo")].ppo.safety_model.endswith("round-3/reward-safety")
    assert stages[(0, "sft")].data.train[0].path == "HuggingFaceH4/ultrachat_200k"  # sft.recipe: recipes/chat.yaml
    with pytest.raises(UserError, match=r"a pipeline recipe .*`llama-ft pipeline"):
        recipe_mod.load(TINY)


@pytest.mark.parametrize("sets, message", [
    (["prompts.pol=x.jsonl"], r"prompts\.pol: unknown key \(did you mean 'pool'\?\)"),
    (["rejection.rejection.kk=3"], r"rejection block .* round 1.*\n  rejection\.kk: unknown key \(did you mean 'k'\?\)"),
    (["reward.train.learning_rate=fast"], r"reward\.train\.learning_rate: .*number"),
    (["rejection.rejection.reward_model=x"], r"rejection\.rejection\.reward_model: set by the pipeline"),
    (["preferences.judge=null"], r"preferences\.source judge needs preferences\.judge"),
    (["methods=[dpo]"], r"methods\.0: .*'rejection', 'ppo' or 'rejection\+ppo'"),
])
def test_a_bad_pipeline_recipe_names_the_key(sets, message):
    with pytest.raises(UserError, match=message):
        pipeline_recipe.load(TINY, sets)


def test_validate_and_plan_take_a_pipeline_recipe():
    result = cli("validate", "recipes/llama2-chat.yaml")
    assert result.returncode == 0 and "valid pipeline recipe" in result.stderr, result.stderr
    planned = pipeline.plan(pipeline_recipe.load(LLAMA2), plan.parse_gpu("t4"))
    assert all(s["plan"].fits for s in planned["stages"])  # one stage at a time on a T4
    assert (planned["largest"]["round"], planned["largest"]["stage"]) == (1, "rejection")
    assert set(planned["round_hours"]) == {0, 1, 2, 3} and all(h > 0 for h in planned["round_hours"].values())
    reward_1, reward_3 = (next(s["plan"] for s in planned["stages"] if (s["round"], s["stage"]) == (k, "reward-helpful"))
                          for k in (1, 3))
    assert reward_3.data.rows == 3 * reward_1.data.rows  # round k trains on rounds 1..k's pairs


def test_a_changed_recipe_is_refused_naming_the_key_and_rounds_may_be_raised():
    old = pipeline_recipe.load(TINY)
    assert pipeline.recipe_changes(old, pipeline_recipe.load(TINY, ["rounds=3"]), started=2) == []
    changed = pipeline.recipe_changes(old, pipeline_recipe.load(TINY, ["reward.train.learning_rate=0.5"]), started=1)
    assert changed == ["reward.train.learning_rate: 0.001 there, 0.5 now"]
    later = pipeline_recipe.load(TINY, ["methods=[rejection, rejection+ppo]"])
    assert pipeline.recipe_changes(old, later, started=1) == []  # round 2 has not started
    assert "round 2 ran as 'rejection'" in pipeline.recipe_changes(old, later, started=2)[0]


def test_a_rounds_rows_split_into_train_and_held_out_pairs_for_each_reward_model(tmp_path):
    pipe = pipeline_recipe.load(TINY, [f"output_dir={tmp_path}", "reward.safety=true", "preferences.held_out_fraction=0.25"])
    rows = [{"prompt": f"Question {i}?", "chosen": f"Right {i}.", "rejected": f"Wrong {i}.", "strength": "better",
             "safety": i in (2, 5)} for i in range(8)]
    prefs = tmp_path / "round-1" / "prefs.jsonl"
    prefs.parent.mkdir()
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = pipeline._split(pipe, 1, prefs)
    assert {k: v for k, v in counts.items() if k.startswith(("rows", "helpful"))} == {
        "rows": 8, "helpful_train": 6, "helpful_eval": 2}
    assert counts["safety_rows"] == 2 and counts["safety_train"] + counts["safety_eval"] >= 2
    read = lambda kind, split: [json.loads(line)["chosen"] for line in
                                pipeline_recipe.pair_file(pipe, 1, kind, split).read_text().splitlines()]
    assert sorted(read("helpful", "train") + read("helpful", "eval")) == sorted(r["chosen"] for r in rows)
    assert not set(read("helpful", "train")) & set(read("helpful", "eval"))  # held-out pairs are never trained on
    assert set(read("safety", "train") + read("safety", "eval")) <= {"Right 2.", "Right 5."}  # the adversarial prompts
    assert pipeline._split(pipe, 1, prefs) == counts  # a seeded draw: the same split on resume
    (tmp_path / "round-1" / "prefs.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(UserError, match="round 1 has 1 preference rows"):
        pipeline._split(pipe, 1, prefs)


# ---------------------------------------------------------------- two rounds on the tiny model


def run_tiny(folder: Path, *sets: str) -> dict:
    return ft.run_pipeline(TINY, overrides=[f"output_dir={folder}", *sets], log=lambda m: None)


# one short round: the machinery (folders, pipeline.json, report, resume) in the default suite, in about a minute
QUICK = ["rounds=1", "prompts.per_round=16", "reward.train.max_steps=10",
         "rejection.rejection.k=2", "rejection.train.max_steps=4", "compare.samples=2"]


@pytest.fixture(scope="module")
def quick_pipeline(tmp_path_factory, tiny_dir):
    folder = shared(tmp_path_factory, "pipeline-quick", lambda f: run_tiny(f / "run", *QUICK))
    return folder / "run"


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, tiny_dir):
    """recipes/tiny-pipeline.yaml as shipped: two rounds (about 3 minutes on 2 busy cores)."""
    folder = shared(tmp_path_factory, "pipeline", lambda f: run_tiny(f / "run"))
    return folder / "run"


@SLOW
def test_rounds_improve_by_the_independent_judge_and_every_figure_is_in_pipeline_json(tiny_pipeline):
    state = json.loads((tiny_pipeline / "pipeline.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    first, second = (r["vs_sft"]["judge"] for r in state["rounds"])
    assert second["win_rate"] >= first["win_rate"] >= 0.5, (first, second)
    assert second["win"] > 0
    for r in state["rounds"]:
        for against in ("vs_sft", "vs_previous"):
            for judge in ("helpfulness", "judge"):
                part = r[against][judge]
                assert part["n"] == 128 and abs(part["win"] + part["tie"] + part["loss"] - 1) < 1e-9
        accuracy = r["reward_accuracy"]["helpful"]
        assert 0 <= accuracy["accuracy"] <= 1 and accuracy["pairs"] >= 1  # on held-out pairs, per round
        assert r["preferences"]["helpful_eval"] >= 1 and r["preferences"]["source"] == "judge"
    assert state["rounds"][1]["reward_accuracy"]["helpful"]["pairs"] > state["rounds"][0]["reward_accuracy"]["helpful"]["pairs"]
    compare = json.loads((tiny_pipeline / "round-2" / "compare-sft" / "compare.json").read_text())
    assert state["rounds"][1]["vs_sft"]["helpfulness"]["win"] == compare["judges"]["helpfulness"]["win"]


def test_each_stage_is_an_ordinary_run_folder_from_an_ordinary_recipe_file(quick_pipeline):
    for k, name, stage in ((0, "sft", "sft"), (1, "reward-helpful", "reward"), (1, "rejection", "rejection")):
        folder = quick_pipeline / f"round-{k}" / name
        assert recipe_mod.load(quick_pipeline / f"round-{k}" / "recipes" / f"{name}.yaml").stage == stage
        assert yaml.safe_load((folder / "recipe.yaml").read_text())["stage"] == stage
    assert (quick_pipeline / "round-1" / "rejection" / "sft" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (quick_pipeline / "round-1" / "prefs.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert all(r["strength"] == "significantly_better" for r in rows)  # a 0/1 judge: margin 1 >= 1.0
    assert not (quick_pipeline / "round-1" / "compare-prev").exists()  # round 1's previous model is the SFT model
    state = json.loads((quick_pipeline / "pipeline.json").read_text())
    [entry] = state["rounds"]
    assert entry["round"] == 1 and entry["vs_previous"] == entry["vs_sft"]
    for judge in ("helpfulness", "judge"):
        part = entry["vs_sft"][judge]
        assert part["n"] == 32 and abs(part["win"] + part["tie"] + part["loss"] - 1) < 1e-9  # 16 prompts x 2 samples
    compare = json.loads((quick_pipeline / "round-1" / "compare-sft" / "compare.json").read_text())
    assert entry["vs_sft"]["helpfulness"]["win"] == compare["judges"]["helpfulness"]["win"]
    assert entry["reward_accuracy"]["helpful"]["pairs"] == entry["preferences"]["helpful_eval"] >= 1


def test_report_and_progress_plot_are_written(quick_pipeline):
    from PIL import Image

    report = (quick_pipeline / "report.md").read_text()
    assert "![progress](progress.png)" in report and "| 1 | rejection | judge |" in report
    with Image.open(quick_pipeline / "progress.png") as image:
        assert image.format == "PNG" and image.size == (1000, 400)  # 10 x 4 inches at 100 dpi


def test_resume_of_a_finished_pipeline_runs_nothing_and_a_changed_recipe_is_refused(quick_pipeline):
    before = (quick_pipeline / "pipeline.json").read_text()
    state = ft.run_pipeline(TINY, overrides=[f"output_dir={quick_pipeline}", *QUICK], resume=True, log=lambda m: None)
    assert state["done"] == json.loads(before)["done"]
    assert json.dumps(state["rounds"], sort_keys=True) == json.dumps(json.loads(before)["rounds"], sort_keys=True)
    with pytest.raises(UserError, match=r"reward\.train\.learning_rate: 0\.001 there, 0\.01 now"):
        ft.run_pipeline(TINY, overrides=[f"output_dir={quick_pipeline}", *QUICK, "reward.train.learning_rate=0.01"],
                        resume=True, log=lambda m: None)
    with pytest.raises(UserError, match="holds a pipeline already; continue it with --resume"):
        ft.run_pipeline(TINY, overrides=[f"output_dir={quick_pipeline}", *QUICK], log=lambda m: None)


@SLOW
def test_kill_9_during_round_1_reward_training_then_resume_ends_with_the_same_figures(tiny_pipeline, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "cli.py"), "pipeline", str(TINY), "--set", f"output_dir={out}"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "round-1" / "reward-helpful" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 900
    while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert checkpoint.is_file(), "round 1's reward training never saved a checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "round-1" / "reward-helpful" / "metrics.json").is_file()  # killed mid-training
    result = run_cli("pipeline", TINY, "--set", f"output_dir={out}", "--resume", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and "from its last checkpoint" in result.stdout
    figures = lambda folder: [{against: {j: {k: p[k] for k in ("win", "tie", "loss", "n")} for j, p in r[against].items()}
                               for against in ("vs_sft", "vs_previous")} | {"accuracy": r["reward_accuracy"]}
                              for r in json.loads((folder / "pipeline.json").read_text())["rounds"]]
    assert figures(out) == figures(tiny_pipeline)


@SLOW
def test_raising_rounds_adds_a_round_and_rejection_then_ppo_runs_ppo_on_the_rejection_model(tiny_pipeline, tmp_path):
    import shutil

    out = tmp_path / "three"
    shutil.copytree(tiny_pipeline, out)
    state = ft.run_pipeline(TINY, overrides=[f"output_dir={out}", "methods=[rejection, rejection, rejection+ppo]"],
                            rounds=3, resume=True, log=lambda m: None)
    assert [(r["round"], r["method"]) for r in state["rounds"]] == [(1, "rejection"), (2, "rejection"), (3, "rejection+ppo")]
    before = json.loads((tiny_pipeline / "pipeline.json").read_text())["rounds"]
    assert [r["vs_sft"] for r in state["rounds"][:2]] == [r["vs_sft"] for r in before]  # rounds 1-2 not run again
    ppo = yaml.safe_load((out / "round-3" / "ppo" / "recipe.yaml").read_text())
    assert ppo["model"]["adapter"] == str(out / "round-3" / "rejection" / "sft")  # PPO on the round's rejection model
    assert ppo["ppo"]["reward_models"] == [str(out / "round-3" / "reward-helpful")]
    assert json.loads((out / "round-3" / "ppo" / "metrics.json").read_text())["iterations"] == 5
    assert state["rounds"][2]["model"] == str(out / "round-3" / "ppo")
    assert set(state["rounds"][2]["vs_previous"]) == {"helpfulness", "judge"}


# ---------------------------------------------------------------- people label the pairs on the annotate page


class Pipeline:
    """`llama-ft pipeline` in the background until it serves the annotate page (its "page: URL" line)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "pipeline", *map(str, args)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = []
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("page: "):
                self.url = line.split()[1]
                break
        else:
            raise AssertionError("the pipeline served no page:\n" + "".join(self.output)[-3000:])

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def label_one(browser, question: str, number: int) -> dict:
    """Ask `question` on the page and say answer A is significantly better; the pair as the page showed it."""
    from selenium.webdriver.common.by import By

    from test_web import by_css, type_into, wait_for

    for _ in range(5):  # a sampled answer can equal the greedy one (or be empty); such a pair cannot be saved: again
        type_into(browser, "#prompt textarea", question)
        by_css(browser, "#ask")[0].click()
        wait_for(lambda: "which answer is better" in by_css(browser, "#status")[0].text, "the two answers")
        a, b = (by_css(browser, f"#answer-{s} textarea")[0].get_attribute("value") for s in "ab")
        if a != b and a.strip() and b.strip():
            break
        browser.execute_script("document.querySelector('#status').innerText = ''")
    browser.find_element(By.XPATH, "//*[@id='strength']//label[normalize-space()='significantly better']").click()
    browser.find_element(By.XPATH, "//*[@id='safety']//label[normalize-space()='both answers are safe']").click()
    by_css(browser, "#a-better")[0].click()
    wait_for(lambda: f"row {number} of" in by_css(browser, "#status")[0].text, "the saved row")
    return {"chosen": a, "rejected": b}


@SLOW
@pytest.mark.e2e
@browser_available
def test_people_label_on_the_annotate_page_rows_survive_kill_9_and_reach_reward_training(tmp_path, tiny_dir, browser):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "people"
    args = [TINY, "--set", f"output_dir={out}", "--set", "preferences.source=people", "--set", "preferences.rows=2",
            "--set", f"preferences.port={port}", "--set", "preferences.temperatures=[0.0,1.2]", "--until", "1/reward"]
    prefs = out / "round-1" / "prefs.jsonl"
    first = Pipeline(*args)
    try:
        browser.get(first.url)
        shown = [label_one(browser, "What is the capital of France?", 1)]
    finally:
        first.kill()  # right after the page said saved
    assert len(prefs.read_text().splitlines()) == 1  # the row is on disk
    second = Pipeline(*args, "--resume")
    try:
        browser.get(second.url)
        shown.append(label_one(browser, "What is the capital of Italy?", 2))
        rest, _ = second.proc.communicate(timeout=900)
    finally:
        if second.proc.poll() is None:
            second.kill()
    assert second.proc.returncode == 0, rest[-3000:]
    assert "2 rows on disk" in rest
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(s["chosen"], s["rejected"]) for s in shown]
    assert rows[0]["chosen_model"] == rows[0]["rejected_model"] == str(out / "round-0" / "sft")  # round 1: SFT twice
    train = [json.loads(line) for line in (out / "round-1" / "pairs-helpful-train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "round-1" / "pairs-helpful-eval.jsonl").read_text().splitlines()]
    assert sorted(r["chosen"] for r in train + held) == sorted(r["chosen"] for r in rows)
    metrics = json.loads((out / "round-1" / "reward-helpful" / "metrics.json").read_text())
    assert metrics["data"]["train"]["examples"] == len(train) and metrics["accuracy"]["pairs"] == len(held)
    assert not (out / "round-1" / "rejection").exists()  # --until 1/reward stopped there
