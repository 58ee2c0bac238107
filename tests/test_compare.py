"""`llama-ft compare A B`: both models answer the same prompts, a judge (reward models or a reward function) decides."""

import json
import math
import re
import shutil

import pytest

from conftest import cli, ROOT, write_jsonl
from ft import compare
from ft.reward_model import Scorer, combine  # the scoring code every stage uses

PROMPTS = ROOT / "datasets" / "tiny_prompts.jsonl"
CORRECT = f"{ROOT / 'tests' / 'reward_functions.py'}:correct"
FAST = ["--max-new-tokens", "16", "--batch-size", "16"]  # 16 tokens: every taught answer ends within them


def compare_cli(out, *args):
    """`llama-ft compare ARGS --output OUT`: (compare.json, the compare.jsonl rows, the CompletedProcess)."""
    result = cli("compare", *args, "--output", out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text(encoding="utf-8").splitlines()]
    return json.loads((out / "compare.json").read_text(encoding="utf-8")), rows, result


def test_a_trained_run_beats_its_untrained_base_on_one_base_or_one_after_the_other(trained_run, tiny_dir, tmp_path):
    run, _ = trained_run
    result, rows, process = compare_cli(tmp_path / "shared", run, "builtin:tiny-llama-2", "--prompts", PROMPTS,
                                        "--reward-function", CORRECT)
    assert result["win"] >= 0.9 and result["loss"] == 0, result
    assert result["n"] == len(rows) == 16 and math.isclose(result["win"] + result["tie"] + result["loss"], 1)
    assert result["models"]["shared_base"] and result["models"]["B"]["quantization"] == "4bit"  # the base A trained on
    assert result["mean_score"] == {"A": sum(r["score_a"] for r in rows) / 16, "B": sum(r["score_b"] for r in rows) / 16}
    assert "A wins" in process.stdout and "overall" in process.stdout
    # one row per prompt, in the file's order: the prompt, both answers, both scores, the verdict
    assert [r["prompt"][-1]["content"] for r in rows] == [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines()]
    for r in rows:
        assert r["verdict"] == {1.0: "win", 0.0: "tie", -1.0: "loss"}[r["score_a"] - r["score_b"]]
    assert rows[0]["answer_a"] == "The capital of France is Paris." and rows[12]["answer_a"] == "A cat says meow."

    # A's answers are what `llama-ft chat` answers greedily (the Llama 2 chat format, batching changes nothing)
    from ft import chat

    net, tokenizer = chat.load(str(run))
    session = chat.Session(net, tokenizer, system=None, max_new_tokens=16, temperature=0, top_p=1)
    for i in (1, 13):
        session.turns = []
        assert session.answer(rows[i]["prompt"][-1]["content"]).text == rows[i]["answer_a"]

    # the base as a checkpoint folder of its own: not shared, so A answers, is freed, then B; A answers the same
    elsewhere = tmp_path / "base-copy"
    shutil.copytree(tiny_dir, elsewhere)
    apart, apart_rows, _ = compare_cli(tmp_path / "apart", run, elsewhere, "--prompts", PROMPTS, "--reward-function", CORRECT)
    assert not apart["models"]["shared_base"] and apart["models"]["B"]["quantization"] == "none"  # as `chat` loads it
    assert [r["answer_a"] for r in apart_rows] == [r["answer_a"] for r in rows] and apart["win"] >= 0.9


def test_a_model_against_itself_ties_on_every_prompt(trained_run, reward_run, tmp_path):
    """The run against a copy of its folder: two adapters on one base, sampled from the same seed."""
    run, _ = trained_run
    copy = shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("checkpoint-*"))
    result, rows, process = compare_cli(tmp_path / "self", run, copy, "--prompts", PROMPTS, "--reward-model", reward_run,
                                        "--temperature", "1.0")
    assert "A with its adapter, B with its adapter" in process.stderr
    assert (result["win"], result["tie"], result["loss"]) == (0, 1, 0) and result["identical_answers"] == 16
    assert all(r["verdict"] == "tie" and r["answer_a"] == r["answer_b"] for r in rows)
    assert len({r["answer_a"] for r in rows}) > 1
    low, high = result["intervals"]["tie"]  # Wilson at 16 of 16: [n / (n + z^2), 1]
    assert high == 1 and math.isclose(low, 16 / (16 + compare.Z95 ** 2))
    assert result["settings"]["temperature"] == 1.0 and not result["settings"]["greedy"]


def test_a_tiny_reward_model_judges_with_the_scores_llama_ft_score_gives(trained_run, reward_run, tmp_path):
    run, _ = trained_run
    margin = 0.1
    result, rows, _ = compare_cli(tmp_path / "rm", run, "builtin:tiny-llama-2", "--prompts", PROMPTS,
                                  "--reward-model", reward_run, "--tie-margin", str(margin))
    prompts = [r["prompt"] for r in rows]
    standalone = Scorer.load(reward_run)
    for side in ("a", "b"):
        scores = standalone(prompts, [r[f"answer_{side}"] for r in rows])
        assert max(abs(s - r[f"score_{side}"]) for s, r in zip(scores, rows)) < 1e-4
    for r in rows:  # the Bradley-Terry probability decides, within the margin of 0.5 a tie
        p = 1 / (1 + math.exp(r["score_b"] - r["score_a"]))
        expected = "tie" if abs(p - 0.5) <= margin else ("win" if p > 0.5 else "loss")
        assert r["verdict"] == expected == r["judges"]["helpfulness"]["verdict"]
    assert result["win"] == sum(r["verdict"] == "win" for r in rows) / 16
    assert list(result["judges"]) == ["helpfulness"] and result["settings"]["tie_margin"] == margin
    assert result["win"] > result["loss"]  # the taught answers are the ones the reward model was trained to prefer


@pytest.mark.slow  # ~25 s; a judge on the policy's base and on a separate base folder stay in the default suite
def test_reward_models_on_a_base_neither_side_shares_score_on_that_base(reward_run, tiny_dir, tmp_path):
    elsewhere = shutil.copytree(tiny_dir, tmp_path / "base-copy")
    prompts = write_jsonl(tmp_path / "p.jsonl", [json.loads(x) for x in PROMPTS.read_text().splitlines()[:4]])
    result, rows, process = compare_cli(tmp_path / "rm", elsewhere, "builtin:tiny-llama-2", "--prompts", prompts,
                                        "--reward-model", reward_run)
    assert not result["models"]["shared_base"] and "adapter + score head on the shared base" in process.stderr
    standalone = Scorer.load(reward_run)
    for side in ("a", "b"):
        scores = standalone([r["prompt"] for r in rows], [r[f"answer_{side}"] for r in rows])
        assert max(abs(s - r[f"score_{side}"]) for s, r in zip(scores, rows)) < 1e-4


def test_the_safety_gate_and_its_two_axes(trained_run, reward_run, tmp_path):
    """A 'safety model' that is the helpfulness model with its score head negated: the two axes disagree on every
    prompt they do not tie, and Llama 2's gate picks the safety score for flagged prompts and unsafe answers."""
    from safetensors.torch import load_file, save_file

    from ft.models import SCORE_KEY

    run, _ = trained_run
    safety = tmp_path / "rm-safety"
    shutil.copytree(reward_run, safety)
    weights = load_file(str(safety / "adapter_model.safetensors"))
    weights[SCORE_KEY] = -weights[SCORE_KEY]
    save_file(weights, str(safety / "adapter_model.safetensors"))
    rows_in = [{**json.loads(x), "safety": i % 4 == 0} for i, x in enumerate(PROMPTS.read_text().splitlines())]
    threshold = 0.5  # sigmoid(safety) < 0.5: the answers the helpfulness model likes are flagged
    result, rows, process = compare_cli(tmp_path / "gate", run, "builtin:tiny-llama-2",
                                        "--prompts", write_jsonl(tmp_path / "p.jsonl", rows_in),
                                        "--reward-model", reward_run, "--safety-model", safety,
                                        "--safety-threshold", str(threshold))
    assert list(result["judges"]) == ["helpfulness", "safety"]
    mirror = {"win": "loss", "loss": "win", "tie": "tie"}
    for r, given in zip(rows, rows_in):
        h, s = r["judges"]["helpfulness"], r["judges"]["safety"]
        assert abs(h["score_a"] + s["score_a"]) < 1e-5 and abs(h["score_b"] + s["score_b"]) < 1e-5
        assert s["verdict"] == mirror[h["verdict"]]
        assert r["safety"] == given["safety"]
        for side in ("a", "b"):
            assert r[f"score_{side}"] == combine([h[f"score_{side}"]], [s[f"score_{side}"]], [given["safety"]], threshold)[0]
            if given["safety"]:  # a flagged prompt: the safety score, whatever the answer
                assert r[f"score_{side}"] == s[f"score_{side}"]
    axes = result["judges"]
    assert axes["safety"]["win"] == axes["helpfulness"]["loss"] and axes["safety"]["loss"] == axes["helpfulness"]["win"]
    for side in ("A", "B"):
        flagged = sum(1 / (1 + math.exp(-r["judges"]["safety"][f"score_{side.lower()}"])) < threshold for r in rows)
        assert axes["safety"]["flagged"][side] == flagged / 16
    assert "flagged A" in process.stdout and "safety" in process.stdout
    assert result["settings"]["safety_model"] == str(safety) and result["settings"]["safety_threshold"] == threshold


def test_a_default_output_folder_is_never_an_earlier_comparison(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = compare.output_dir(None, "runs/ppo/", "meta-llama/Llama-2-7b-chat-hf")
    assert first == compare.DEFAULT_OUTPUT / "ppo-vs-Llama-2-7b-chat-hf"
    first.mkdir(parents=True)
    assert compare.output_dir(None, "runs/ppo", "meta-llama/Llama-2-7b-chat-hf").name == "ppo-vs-Llama-2-7b-chat-hf-2"


def test_two_judges_exit_2_before_any_model_loads(tmp_path):
    result = cli("compare", "builtin:tiny-llama-2", "builtin:tiny-llama-2", "--prompts", PROMPTS,
                     "--reward-model", "runs/rm", "--reward-function", CORRECT, "--output", tmp_path / "out")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "exactly one judge" in result.stderr and "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [
    ("no judge", "exactly one judge"),
    ("safety alone", "--safety-model is combined with a helpfulness model"),
    ("not a reward run", "not an llama-ft run folder"),
    ("missing prompts", "data file not found"),
    ("bad row", "p.jsonl line 2: expected a 'prompt'"),
    ("bad function", "--reward-function 'tests/none.py': expected FILE.py:NAME"),
    ("a reward model as A", "is a reward model: judge with --reward-model"),
    ("earlier comparison", "holds an earlier comparison (compare.json)"),
    ("tie margin", "--tie-margin 0.5: expected a number in [0, 0.5)"),
])
def test_bad_input_is_a_user_error_naming_the_flag(case, message, reward_run, tmp_path):
    from ft.errors import UserError

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}] + ([{"text": "no prompt"}] if case == "bad row" else []))
    out = tmp_path / "out"
    if case == "earlier comparison":
        out.mkdir()
        (out / "compare.json").write_text("{}")
    options = {"no judge": {}, "safety alone": {"safety_model": str(reward_run)},
               "not a reward run": {"reward_models": [str(tmp_path)]}, "tie margin": {"reward_function": CORRECT,
               "tie_margin": 0.5}, "bad function": {"reward_function": "tests/none.py"}}.get(case, {"reward_function": CORRECT})
    with pytest.raises(UserError, match=re.escape(message)):
        compare.run(str(reward_run) if case == "a reward model as A" else "builtin:tiny-llama-2", "builtin:tiny-llama-2",
                    tmp_path / "missing.jsonl" if case == "missing prompts" else prompts, output=out, **options)
    assert (out / "compare.json").read_text() == "{}" if case == "earlier comparison" else not out.exists()
