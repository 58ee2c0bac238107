"""`llama-ft eval` on the tiny model: the shipped multiple-choice task of the facts recipes/tiny.yaml teaches, scored
in the Llama 2 chat format through lm-evaluation-harness; the same figure as a plain lm_eval run on the merged model;
the JSON; the recipe's eval: section; the errors a user meets (exit 2)."""

import json
import subprocess
import sys

import pytest

from conftest import cli, ROOT, run_cli

TASK = "datasets/tiny_facts_mc.yaml"
ACC = "acc,none"


def test_trained_run_knows_the_facts_its_base_is_at_chance_and_the_json_says_how(trained_run, tmp_path):
    import lm_eval

    run, _ = trained_run
    out = tmp_path / "eval.json"
    result = cli("eval", run, "--tasks", TASK, "--base", "--batch-size", "3", "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["results"]["tiny_facts_mc"][ACC] >= 0.9
    assert report["base_results"]["tiny_facts_mc"][ACC] <= 0.5  # 4 choices: chance is 0.25
    assert {ACC, "acc_stderr,none"} <= set(report["results"]["tiny_facts_mc"])  # lm-eval's own layout
    assert report["n-samples"]["tiny_facts_mc"]["effective"] == 28 and report["n-shot"]["tiny_facts_mc"] == 0
    assert report["versions"]["tiny_facts_mc"] == 1.0 and report["lm_eval_version"] == lm_eval.__version__
    assert report["settings"] == {"tasks": [TASK], "include_path": None, "num_fewshot": None, "limit": None,
                                  "batch_size": 3, "chat_template": True, "system": None}  # auto: on for a chat run
    assert report["model"] == {"model": str(run), "kind": "run", "stage": "sft", "base": "builtin:tiny-llama-2",
                               "adapter": str(run), "quantization": "4bit", "chat_tuned": True}
    row = next(line for line in result.stdout.splitlines() if line.startswith("tiny_facts_mc"))
    accuracy, base = report["results"]["tiny_facts_mc"][ACC], report["base_results"]["tiny_facts_mc"][ACC]
    assert f"{accuracy:.4f}" in row and f"{base:.4f}" in row and f"{accuracy - base:+.4f}" in row
    assert "paper" not in report and "paper" not in result.stdout  # the tiny model is no Llama 2 checkpoint
    assert not (run / "eval").exists()  # --output went where it was told


def test_merged_folder_scores_as_a_plain_lm_eval_run_with_its_saved_chat_template(merged, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ft import evaluation

    _, folder = merged
    ours = evaluation.evaluate(str(folder), [TASK], log=lambda *a: None)
    assert ours["settings"]["chat_template"] is True and ours["model"]["kind"] == "merged"

    # plain lm-eval: its own model loading and tokenizer (the merged folder's, with the saved template); it reads the
    # YAML's data_files from the current directory
    monkeypatch.chdir(ROOT / "datasets")
    plain = simple_evaluate(model=HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=8),
                            tasks=["tiny_facts_mc"],
                            task_manager=TaskManager(include_path=str(ROOT / "datasets"), include_defaults=False),
                            apply_chat_template=True, fewshot_as_multiturn=True, log_samples=False, bootstrap_iters=0)
    assert ours["results"]["tiny_facts_mc"][ACC] == plain["results"]["tiny_facts_mc"][ACC] >= 0.9


def test_scored_ids_are_the_chat_format_ids_of_the_dialog_with_that_answer(tokenizer):
    from lm_eval.models.huggingface import HFLM

    from ft import chat_format, evaluation, models, tiny
    from ft.recipe import ModelSection

    net = models.load_model(ModelSection(name=tiny.NAME, quantization="none"))
    lm = evaluation.harness_model(net, tokenizer, chat=True, batch_size=1)
    _, [task] = evaluation.load_tasks([TASK])
    task.build_all_requests(limit=None, rank=0, world_size=1, system_instruction="Answer in one sentence.",
                            apply_chat_template=True, fewshot_as_multiturn=True, chat_template=lm.apply_chat_template)
    docs = list(task.eval_docs)
    closing = [tokenizer.convert_tokens_to_ids("▁"), tokenizer.eos_token_id]  # the " </s>" after a trained answer
    checked = 0
    for instance in task.instances:
        doc = docs[instance.doc_id]
        context, continuation = instance.args
        system = "Answer in one sentence." + (f"\n\n{doc['system']}" if doc["system"] else "")
        dialog = [{"role": "system", "content": system}, {"role": "user", "content": doc["question"]},
                  {"role": "assistant", "content": doc["choices"][instance.idx]}]
        trained = chat_format.encode_reference(tokenizer, dialog)  # Meta's ids for this dialog with this answer
        context_ids, answer_ids = lm._encode_pair(context, continuation)
        assert context_ids + answer_ids + closing == trained
        # an answer written without its leading space is scored the same; lm-eval's own chat path would not
        assert lm._encode_pair(context, continuation.strip()) == (context_ids, answer_ids)
        plain = HFLM._encode_pair(lm, context, continuation.strip())
        assert plain != (context_ids, answer_ids)
        checked += 1
    assert checked == 28 * 4


@pytest.mark.e2e
def test_eval_section_runs_at_the_end_of_training_with_and_without_the_adapter(tmp_path):
    from ft import recipe, recipe_keys
    from ft.errors import UserError

    out = tmp_path / "run"
    result = cli("sft", "recipes/tiny.yaml", "--output-dir", out, "--set", "train.max_steps=2",
                     "--set", "train.generate_samples=0", "--set", "train.report_to=none",
                     "--set", f"eval={{tasks: {TASK}, limit: 8, num_fewshot: 2, system: You are a terse assistant.}}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["eval"]
    assert set(report["results"]) == set(report["base_results"]) == {"tiny_facts_mc"}
    assert report["n-samples"]["tiny_facts_mc"]["effective"] == 8 and report["n-shot"]["tiny_facts_mc"] == 2
    assert report["settings"]["system"] == "You are a terse assistant." and report["settings"]["limit"] == 8
    [written] = (out / "eval").glob("eval-*.json")  # a run folder's default: a new file in RUN/eval/
    assert json.loads(written.read_text()) == report
    assert metrics["global_step"] == 2 and "loss_last" in metrics  # the stage's own metrics stay
    assert "tiny_facts_mc" in result.stdout and result.stdout.rstrip().endswith(f"llama-ft merge {out} --output <dir>")

    base = yaml_recipe()
    with pytest.raises(UserError, match="eval.tasks: List should have at least 1 item"):
        recipe.validate({**base, "eval": {"tasks": []}})
    with pytest.raises(UserError, match="eval.limt: unknown key .did you mean 'limit'"):
        recipe.validate({**base, "eval": {"tasks": ["mmlu"], "limt": 5}})
    with pytest.raises(UserError, match="a reward model is not one"):
        recipe.validate({**base, "stage": "reward", "eval": {"tasks": ["mmlu"]}})
    assert recipe.validate({**base, "eval": {"tasks": "mmlu, arc_easy"}}).eval.tasks == ["mmlu", "arc_easy"]
    assert ("eval.num_fewshot", "None", "Few-shot examples per question (default: each task's own).") in recipe_keys.field_docs()


def yaml_recipe() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())


def test_unknown_task_exits_2_with_the_closest_names():
    result = cli("eval", "builtin:tiny-llama-2", "--tasks", "arc_eassy")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "unknown task 'arc_eassy'; closest: arc_easy" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_builtin_task_whose_data_is_not_cached_offline_exits_2_naming_task_and_dataset(tmp_path):
    result = run_cli("eval", "builtin:tiny-llama-2", "--tasks", "arc_easy", env={"HF_DATASETS_CACHE": str(tmp_path)})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "task arc_easy: its dataset allenai/ai2_arc is not in the Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_without_lm_eval_installed_eval_exits_2_with_the_install_line():
    code = ("import sys; sys.modules['lm_eval'] = None; "  # what Python does when a package is not installed
            f"sys.argv = ['llama-ft', 'eval', 'builtin:tiny-llama-2', '--tasks', '{TASK}']; "
            "from ft.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "llama-ft eval needs lm-evaluation-harness" in result.stderr and "pip install 'llama-ft[eval]'" in result.stderr


def test_paper_figures_beside_a_llama_2_base_and_never_beside_truthfulqa(tmp_path):
    from ft import evaluation, llama2_paper

    results = {"results": {"mmlu": {"alias": "mmlu", ACC: 0.47, "acc_stderr,none": 0.004},
                           "truthfulqa_mc2": {"alias": "truthfulqa_mc2", ACC: 0.39, "acc_stderr,none": 0.01},
                           "hellaswag": {"alias": "hellaswag", ACC: 0.57, "acc_norm,none": 0.76}},
               "n-shot": {"mmlu": 5, "truthfulqa_mc2": 0, "hellaswag": 0}, "n-samples": {}}
    lineage = evaluation.describe("meta-llama/Llama-2-13b-chat-hf")
    assert lineage["chat_tuned"] and lineage["kind"] == "checkpoint"
    report = evaluation.make_report(results, None, settings={"chat_template": True}, lineage=lineage,
                                    lm_eval_version="x", seconds=1.0)
    assert report["paper"]["figures"] == {
        "mmlu": {ACC: {"value": 0.548, "shots": 5, "source": "Table 3", "size": "13B"}},
        "hellaswag": {"acc_norm,none": {"value": 0.807, "shots": 0, "source": "Table 20", "size": "13B"}}}
    table = evaluation.render(report).splitlines()
    assert "paper 0.548 (Llama 2 13B, 5-shot, Table 3)" in next(line for line in table if line.startswith("mmlu"))
    assert "paper" not in next(line for line in table if line.startswith("truthfulqa_mc2"))
    assert table[-1].startswith(llama2_paper.CAVEAT)
    assert "paper" not in evaluation.make_report(results, None, settings={}, lineage=evaluation.describe(
        "NousResearch/Nous-Hermes-13b"), lm_eval_version="x", seconds=1.0)
    assert "truthfulqa" not in json.dumps(llama2_paper.FIGURES) and "toxigen" not in json.dumps(llama2_paper.FIGURES)

    (tmp_path / "eval-x.json").write_text("{}")
    first = evaluation._new_file(tmp_path)
    first.write_text("{}")
    assert evaluation._new_file(tmp_path) not in (first, tmp_path / "eval-x.json")
