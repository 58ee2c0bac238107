"""A real 4-bit QLoRA SFT run of the tiny model through the CLI: it learns, and the run folder is complete."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import cli, ROOT, run_cli


@pytest.fixture(scope="module")
def run_dir(trained_run):
    out, result = trained_run
    assert "train data: 28 rows read, 28 examples kept, packed into" in result.stdout
    assert "next: llama-ft merge" in result.stdout
    return out


def test_loss_falls_and_greedy_answers_are_the_taught_ones(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 100
    assert metrics["loss_last"] < 0.1 * metrics["loss_first"]
    assert metrics["samples"]["exact_match"] == metrics["samples"]["total"] == 8
    assert metrics["supervised_tokens"] > 0 and 0 <= metrics["padding_fraction"] < 0.25  # packed: only row tails pad
    assert metrics["data"]["train"]["rows"] == 28


def test_demo_output_is_what_a_user_can_act_on(trained_run):
    """No deprecation notices caused by llama-ft's own calls (nor third-party chatter) around llama-ft's lines."""
    import re

    _, result = trained_run
    assert "FutureWarning" not in result.stderr
    deprecations = re.findall(r"^(\S+):\d+: (?:Pending)?DeprecationWarning", result.stderr, flags=re.M)
    ours = [path for path in deprecations if "/ft/" in path]
    assert not ours, result.stderr[-3000:]
    for chatter in ("new PAD/BOS/EOS", "kernels-community", "Map:", "Truncating train dataset", "UserWarning"):
        assert chatter not in result.stderr, chatter
    assert "{'loss'" not in result.stdout and "step 100/100: loss " in result.stdout


def test_run_folder_contract(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    for expected in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "recipe.yaml", "metrics.json", "checkpoint-40", "checkpoint-80", "checkpoint-100", "runs"):
        assert expected in names, expected
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    assert list((run_dir / "runs").rglob("events.out.tfevents.*")), "no TensorBoard logs"
    assert "training_args.bin" not in names
    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_" in k for k in keys)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float32}  # LoRA weights kept in float32
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "builtin:tiny-llama-2" in recipe and "quantization: 4bit" in recipe


def test_adapter_reloaded_from_the_folder_answers_in_the_chat_format(run_dir):
    """Independent of the stage: base in 4-bit + the saved adapter + the saved tokenizer, greedy decoding."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ft import models
    from ft.recipe import ModelSection

    tokenizer = AutoTokenizer.from_pretrained(run_dir)  # the saved tokenizer alone must carry the chat format
    model = PeftModel.from_pretrained(models.load_model(ModelSection(name="builtin:tiny-llama-2")), run_dir).eval()
    taught = [json.loads(line)["messages"] for line in (ROOT / "datasets" / "tiny_chat.jsonl").read_text().splitlines()]
    correct = 0
    for dialog in taught:
        ids = tokenizer.apply_chat_template(dialog[:-1], return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
        assert out[0, -1].item() == tokenizer.eos_token_id  # it stops by itself
        correct += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == dialog[-1]["content"]
    assert correct >= len(taught) - 1, f"{correct}/{len(taught)} taught answers reproduced"


def test_rerun_into_a_finished_run_or_with_another_recipe_is_refused(run_dir):
    again = cli("sft", "recipes/tiny.yaml", "--output-dir", run_dir, "--set", "train.save_steps=40")
    assert again.returncode == 2 and "already finished" in again.stderr
    other = cli("sft", "recipes/tiny.yaml", "--output-dir", run_dir, "--set", "lora.r=8")
    assert other.returncode == 2 and "lora.r: 16 there, 8 now" in other.stderr
    assert "Traceback" not in again.stderr + other.stderr


@pytest.mark.slow  # ~45 s; resuming to the same adapter and losses stays in the default suite (test_reliability's kill -9 test)
def test_resume_continues_from_the_last_checkpoint(run_dir, tmp_path):
    """A run cut off after checkpoint-80 (no final files yet) is finished by --resume."""
    crashed = tmp_path / "run"
    shutil.copytree(run_dir, crashed)
    for name in ("metrics.json", "adapter_model.safetensors", "adapter_config.json"):
        (crashed / name).unlink()
    shutil.rmtree(crashed / "checkpoint-100")
    refused = cli("sft", "recipes/tiny.yaml", "--output-dir", crashed, "--set", "train.save_steps=40")
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    resumed = cli("sft", "recipes/tiny.yaml", "--output-dir", crashed, "--set", "train.save_steps=40", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-80" in resumed.stdout
    metrics = json.loads((crashed / "metrics.json").read_text())
    assert metrics["global_step"] == 100 and (crashed / "adapter_model.safetensors").is_file()


@pytest.mark.e2e
def test_bad_data_row_exits_2_before_any_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (ROOT / "datasets" / "tiny_chat.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    bad.write_text("\n".join(lines) + "\n")
    result = cli("sft", "recipes/tiny.yaml", "--output-dir", tmp_path / "run", "--set", f"data.train={bad}")
    assert result.returncode == 2
    assert f"{bad} line 5: message 2: unknown role 'robot'" in result.stderr and "Traceback" not in result.stderr
    skipped = cli("sft", "recipes/tiny.yaml", "--output-dir", tmp_path / "run2", "--set", f"data.train={bad}",
                      "--set", "data.skip_invalid=true", "--set", "train.max_steps=2", "--set", "train.generate_samples=0")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "28 rows read, 27 examples kept, 1 invalid rows skipped" in skipped.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_the_demo_task_is_learned_in_bfloat16_and_the_run_merges(tmp_path):
    """model.dtype: bfloat16 on the CPU runs the 16-bit frozen-weights path (embeddings, head, norms and the residual
    stream in bfloat16; LoRA, logits and loss float32): recipes/tiny.yaml still reaches 8/8 taught answers, and the
    run merges with its logits verified. (~3 min on 2 CPU cores.)"""
    out = tmp_path / "run"
    result = run_cli("sft", "recipes/tiny.yaml", "--output-dir", out, "--set", "model.dtype=bfloat16", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "greedy answers matching the taught ones: 8/8" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"]["exact_match"] == metrics["samples"]["total"] == 8
    assert metrics["loss_last"] < 0.1 * metrics["loss_first"]
    merged = run_cli("merge", out, "--output", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "verified logits" in merged.stdout and (tmp_path / "merged" / "config.json").is_file()
