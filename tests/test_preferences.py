"""Preference learning: pair checks, Llama 2's reward margins, a reward model that ranks, DPO that moves."""

import json

import pytest
import torch

from conftest import cli, ROOT, TINY, write_jsonl
from ft import data
from ft.errors import UserError
from ft.recipe import DataSource



def test_pair_forms_and_hh_dialogs():
    assert data.to_pair({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."})["prompt"] == [{"role": "user", "content": "Q?"}]
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Peru?\n\nAssistant: Lima.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of Peru?\n\nAssistant: No idea."}
    pair = data.to_pair(hh)
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user"]
    assert (pair["chosen"], pair["rejected"]) == ("Lima.", "No idea.")
    messages = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                "chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]}
    assert data.to_pair(messages)["chosen"] == "A"


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "Q", "chosen": "Same.", "rejected": "Same."}, "identical"),
    ({"prompt": "Q", "chosen": "A"}, "missing field 'rejected'"),
    ({"prompt": "Q", "chosen": "A", "rejected": "B", "strength": "much_better"}, "unknown strength 'much_better'"),
    ({"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "big"}, "must be a number"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "share everything"),
])
def test_bad_preference_rows_name_the_line(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}, row])
    with pytest.raises(UserError, match=rf"p\.jsonl line 2: .*{reason}"):
        data.load_pairs([DataSource(path=str(path))], skip_invalid=False)
    pairs, report = data.load_pairs([DataSource(path=str(path))], skip_invalid=True)
    assert len(pairs) == 1 and report.skipped_invalid == 1


def test_margins_are_llama2s_and_the_loss_follows_the_formula(tokenizer, tiny_dir):
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from ft import models
    from ft.recipe import LoraSection, ModelSection
    from ft.stages.reward import tokenize_pairs

    pairs = [data.to_pair({"prompt": "Q", "chosen": "Good answer.", "rejected": "Bad.", "strength": s}) for s in data.STRENGTHS]
    assert [data.pair_margin(p, "small") for p in pairs] == [1.0, 2 / 3, 1 / 3, 0.0]
    assert [data.pair_margin(p, "large") for p in pairs] == [3.0, 2.0, 1.0, 0.0]
    assert [data.pair_margin(p, "none") for p in pairs] == [0.0] * 4
    dataset = tokenize_pairs(pairs, tokenizer, 256, "large", data.Report())
    assert dataset["margin"] == [3.0, 2.0, 1.0, 0.0]

    model = models.attach_lora(models.load_model(ModelSection(name="builtin:tiny-llama-2", quantization="none"), reward=True),
                               LoraSection(), gradient_checkpointing=False, reward=True)
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir="/tmp/unused-reward", use_cpu=True, report_to=[]),
                            train_dataset=dataset, processing_class=tokenizer)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    chosen, rejected = rewards[:4], rewards[4:]
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - torch.tensor([3.0, 2.0, 1.0, 0.0])).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    without = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert loss > without  # a margin asks for a larger gap


def test_reward_model_ranks_held_out_pairs(reward_run):
    metrics = json.loads((reward_run / "metrics.json").read_text())
    assert metrics["accuracy_split"] == "eval" and metrics["accuracy"]["pairs"] == 6
    assert metrics["accuracy"]["overall"] >= 5 / 6
    assert set(metrics["accuracy"]["by_strength"]) == set(data.STRENGTHS)
    assert metrics["margin"] == "small"
    assert (reward_run / "adapter_model.safetensors").is_file()
    from ft import hub

    card = hub.model_card(reward_run, "alice/tiny-reward")
    assert "pipeline_tag: text-classification" in card and "- reward\n" in card
    assert f"pairwise accuracy {metrics['accuracy']['overall']:.1%} (eval)" in card
    assert "AutoPeftModelForSequenceClassification" in card


def test_score_command_one_pair_and_jsonl(reward_run, tmp_path):
    good = cli("score", reward_run, "--prompt", "What is the capital of India?", "--response", "The capital of India is Delhi.")
    bad = cli("score", reward_run, "--prompt", "What is the capital of India?", "--response", "I do not know.")
    assert good.returncode == bad.returncode == 0, good.stderr[-2000:]
    assert float(good.stdout) > float(bad.stdout)
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "What does a bee say?", "response": "Maybe."},
                                               {"prompt": "What does a bee say?", "response": "A bee says buzz."}])
    result = cli("score", reward_run, "--input", rows, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert scored[1]["score"] > scored[0]["score"] and scored[0]["response"] == "Maybe."
    for command in (["chat", reward_run, "--prompt", "hi"], ["merge", reward_run, "--output", tmp_path / "m"]):
        wrong = cli(*command)
        assert wrong.returncode == 2 and "reward model" in wrong.stderr and "Traceback" not in wrong.stderr
    bad_rows = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "A"}])
    refused_rows = cli("reward", "recipes/reward-helpful.yaml", "--output-dir", tmp_path / "r", *TINY,
                           "--set", f"data.train={bad_rows}", "--set", "data.eval=null")
    assert refused_rows.returncode == 2 and "pairs.jsonl line 1: chosen and rejected answers are identical" in refused_rows.stderr
    bad_input = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q"}])
    refused = cli("score", reward_run, "--input", bad_input)
    assert refused.returncode == 2 and "bad.jsonl line 1" in refused.stderr


def test_dpo_moves_greedy_answers_to_the_chosen_ones(trained_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ft import models
    from ft.recipe import ModelSection

    sft, _ = trained_run
    out = tmp_path / "dpo"
    result = cli("dpo", "recipes/dpo.yaml", "--output-dir", out, *TINY, "--set", f"model.adapter={sft}",
                     "--set", "data.train=datasets/tiny_dpo.jsonl", "--set", "data.eval=null", "--set", "train.batch_size=4",
                     "--set", "train.max_steps=60", "--set", "train.learning_rate=5e-4", "--set", "dpo.sft_weight=2.0")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference"] == "frozen copy of the SFT adapter"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16 and not (out / "ref").exists()
    from ft import hub

    card = hub.model_card(out, "alice/tiny-dpo")  # the lineage: the SFT run this DPO run continued, then DPO
    assert "| 1 | sft | `datasets/tiny_chat.jsonl` |" in card and "| 2 | dpo | `datasets/tiny_dpo.jsonl` | 60 |" in card
    assert "- sft\n- dpo\n" in card

    pairs = [json.loads(line) for line in (ROOT / "datasets" / "tiny_dpo.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(out)

    def answers_and_margins(adapter):
        model = PeftModel.from_pretrained(models.load_model(ModelSection(name="builtin:tiny-llama-2")), adapter).eval()
        answers, margins = [], []
        for pair in pairs:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": pair["prompt"]}], return_dict=True)["input_ids"]
            out_ids = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
            answers.append(tokenizer.decode(out_ids[0, len(prompt):], skip_special_tokens=True).strip())
            logps = []
            for answer in (pair["chosen"], pair["rejected"]):
                ids = tokenizer.apply_chat_template([{"role": "user", "content": pair["prompt"]},
                                                     {"role": "assistant", "content": answer}], return_dict=True)["input_ids"]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
                logps.append(logits[range(len(prompt) - 1, len(ids) - 1), ids[len(prompt):]].sum().item())
            margins.append(logps[0] - logps[1])
        return answers, margins

    before_answers, before = answers_and_margins(sft)
    after_answers, after = answers_and_margins(out)
    assert sum(after) / len(after) > sum(before) / len(before)
    assert sum(a == p["rejected"] for a, p in zip(before_answers, pairs)) >= 18  # SFT taught the long answers
    flipped = sum(a == p["chosen"] for a, p in zip(after_answers, pairs))
    assert flipped >= 15, f"only {flipped}/20 greedy answers moved to the chosen ones: {after_answers}"


def test_safety_combination_follows_llama2():
    from ft.reward_model import combine

    helpful, safety = [5.0, 5.0, 5.0], [3.0, -3.0, 3.0]  # sigmoid(-3) = 0.047 < 0.15
    assert combine(helpful, safety, [False, False, True], 0.15) == [5.0, -3.0, 3.0]
    assert combine(helpful, None, [True, True, True], 0.15) == helpful


def test_rejection_sampling_keeps_the_best_sample_and_fine_tunes_on_it(trained_run, reward_run, tmp_path):
    from ft.recipe import DataSource
    from ft.reward_model import Scorer

    sft, _ = trained_run
    out = tmp_path / "rejection"
    result = cli("rejection", "recipes/rejection.yaml", "--output-dir", out, *TINY, "--set", f"model.adapter={sft}",
                     "--set", "data.train=datasets/tiny_prompts.jsonl", "--set", f"rejection.reward_model={reward_run}",
                     "--set", "rejection.safety_model=null", "--set", "rejection.temperature=1.5",
                     "--set", "rejection.max_new_tokens=24", "--set", "rejection.batch_size=4", "--set", "train.max_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(r["samples"]) == len(r["scores"]) == 4 for r in rows)
    assert any(len(set(r["samples"])) > 1 for r in rows), "sampling produced no variety"
    rescored = Scorer.load(reward_run)([r["messages"][:-1] for r in rows], [r["messages"][-1]["content"] for r in rows])
    for row, score in zip(rows, rescored):
        assert row["score"] == max(row["scores"])  # the best of the K is kept
        assert row["messages"][-1]["content"] == row["samples"][row["scores"].index(row["score"])]
        assert abs(score - row["score"]) < 1e-3  # and it really scores that
    dialogs, report = data.load_dialogs([DataSource(path=str(out / "samples.jsonl"))], skip_invalid=False)
    assert len(dialogs) == 16  # valid SFT input
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_max_reward"] >= metrics["mean_reward"] and metrics["gain"] >= 0
    assert (out / "sft" / "adapter_model.safetensors").is_file() and metrics["sft"]["loss_last"] is not None


def test_a_reward_model_continuing_an_sft_adapter_trains_and_saves_a_score_head(trained_run):
    from safetensors.torch import load_file

    from ft import models
    from ft.recipe import LoraSection, ModelSection

    sft, _ = trained_run
    base = models.load_model(ModelSection(name="builtin:tiny-llama-2"), reward=True)
    model = models.attach_lora(base, LoraSection(), adapter=str(sft), gradient_checkpointing=False, reward=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    saved = load_file(str(sft / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    for key, value in saved.items():  # the SFT adapter's LoRA weights are where the reward model starts
        assert torch.equal(params[key.replace(".weight", ".default.weight")].detach(), value)
    model.save_pretrained(str(sft.parent / "rm-from-sft"))
    assert "base_model.model.score.weight" in load_file(str(sft.parent / "rm-from-sft" / "adapter_model.safetensors"))


@pytest.mark.e2e
@pytest.mark.slow
def test_reward_model_learns_in_bfloat16(tmp_path):
    """The reward model with model.dtype: bfloat16 (16-bit frozen weights, the float32 score head fed float32)
    ranks the held-out pairs as the float32 one does (reward_run)."""
    out = tmp_path / "reward"
    result = cli("reward", "recipes/reward-helpful.yaml", "--output-dir", out, *TINY,
                     "--set", "data.train=datasets/tiny_prefs.jsonl", "--set", "data.eval=datasets/tiny_prefs_eval.jsonl",
                     "--set", "train.max_steps=60", "--set", "train.learning_rate=1e-3", "--set", "train.batch_size=4",
                     "--set", "model.dtype=bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"]["pairs"] == 6 and metrics["accuracy"]["overall"] >= 5 / 6


@pytest.mark.slow
def test_dpo_learns_in_bfloat16(trained_run, tmp_path):
    """DPO with model.dtype: bfloat16 moves the greedy answers (generated in bfloat16) to the chosen ones."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ft import models
    from ft.recipe import ModelSection

    sft, _ = trained_run
    out = tmp_path / "dpo"
    result = cli("dpo", "recipes/dpo.yaml", "--output-dir", out, *TINY, "--set", f"model.adapter={sft}",
                     "--set", "data.train=datasets/tiny_dpo.jsonl", "--set", "data.eval=null", "--set", "train.batch_size=4",
                     "--set", "train.max_steps=60", "--set", "train.learning_rate=5e-4", "--set", "dpo.sft_weight=2.0",
                     "--set", "model.dtype=bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = [json.loads(line) for line in (ROOT / "datasets" / "tiny_dpo.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = models.load_model(ModelSection(name="builtin:tiny-llama-2", dtype="bfloat16"))
    model = PeftModel.from_pretrained(base, out).eval()
    chosen = 0
    for pair in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": pair["prompt"]}], return_dict=True)["input_ids"]
        ids = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        chosen += tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True).strip() == pair["chosen"]
    assert chosen >= 15, f"only {chosen}/20 greedy answers moved to the chosen ones"
