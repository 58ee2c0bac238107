"""Crashes, interrupts, changed inputs, unwritable and full disks, trust_remote_code: what a week-long run relies on."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, ROOT

QUICK = ["--set", "train.logging_steps=1", "--set", "train.generate_samples=0", "--set", "train.report_to=none"]


def sft_args(out, *extra):
    return ["sft", "recipes/tiny.yaml", "--output-dir", out, *QUICK, *extra]


def start_cli(*args):
    """The CLI as a background process; its stdout+stderr are collected in `proc.output` as they arrive."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=ROOT, env={**os.environ},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.output = ""

    def pump():
        for chunk in iter(lambda: proc.stdout.read(1), ""):
            proc.output += chunk

    proc.pump = threading.Thread(target=pump, daemon=True)
    proc.pump.start()
    return proc


def wait_for(condition, proc, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{proc.output[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def finish(proc, timeout=300):
    proc.wait(timeout=timeout)
    proc.pump.join(timeout=10)
    return proc.returncode, proc.output


def adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


@pytest.mark.e2e
def test_kill_9_after_a_checkpoint_then_resume_gives_the_same_adapter_and_losses(tmp_path):
    steps = ["--set", "train.max_steps=12", "--set", "train.save_steps=4"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    result = cli(*sft_args(straight, *steps))
    assert result.returncode == 0, result.stderr[-3000:]

    proc = start_cli(*sft_args(crashed, *steps))
    wait_for(lambda: (crashed / "checkpoint-8" / "trainer_state.json").exists(), proc, "checkpoint-8")
    proc.send_signal(signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    assert not (crashed / "metrics.json").exists() and not (crashed / "adapter_model.safetensors").exists()

    result = cli(*sft_args(crashed, *steps), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    a, b = adapter(straight), adapter(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, on the CPU
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (straight, crashed))
    assert len(ma["loss_history"]) == 12 and ma["loss_history"] == mb["loss_history"]
    assert mb["resumed_from"].endswith(("checkpoint-8", "checkpoint-4"))  # -4 if kill -9 cut checkpoint-8's state file


@pytest.mark.slow  # ~1 min each
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_reward_and_dpo_resume_to_the_same_result(stage, trained_run, tmp_path):
    common = ["--set", "model.name=builtin:tiny-llama-2", "--set", "data.max_length=256", "--set", "data.eval=null",
              "--set", "train.report_to=none", "--set", "train.logging_steps=1", "--set", "train.max_steps=12",
              "--set", "train.save_steps=4", "--set", "train.gradient_checkpointing=false"]
    if stage == "reward":
        args = ["reward", "recipes/reward-helpful.yaml", *common, "--set", "data.train=datasets/tiny_prefs.jsonl",
                "--set", "train.learning_rate=1e-3", "--set", "train.batch_size=4", "--set", "train.gradient_accumulation_steps=16"]
    else:  # the SFT adapter continues, with TRL's frozen "ref" copy of it as the reference
        args = ["dpo", "recipes/dpo.yaml", *common, "--set", f"model.adapter={trained_run[0]}",
                "--set", "data.train=datasets/tiny_dpo.jsonl", "--set", "train.batch_size=4",
                "--set", "dpo.sft_weight=2.0", "--set", "train.learning_rate=5e-4"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert cli(*args, "--output-dir", straight).returncode == 0
    proc = start_cli(*args, "--output-dir", crashed)
    wait_for(lambda: (crashed / "checkpoint-8" / "trainer_state.json").exists(), proc, "checkpoint-8")
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    result = cli(*args, "--output-dir", crashed, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = adapter(straight), adapter(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (straight, crashed))
    assert len(ma["losses"]) == 12 and ma["losses"] == mb["losses"]


def test_an_incomplete_checkpoint_is_skipped_on_resume(tmp_path):
    from ft import runs

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    assert runs.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-8").exists()


@pytest.mark.e2e
@pytest.mark.slow  # ~75 s; the signal path stays in the default suite (test_sigterm_saves_a_checkpoint_like_ctrl_c) and so does bit-exact resuming (the kill -9 test)
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    out = tmp_path / "run"
    args = sft_args(out, "--set", "train.max_steps=40", "--set", "train.save_steps=1000")
    proc = start_cli(*args)
    wait_for(lambda: "loss=" in proc.output, proc, "the first logged loss")
    proc.send_signal(signal.SIGINT)
    code, output = finish(proc)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file() and (saved[0] / "optimizer.pt").is_file()
    step = int(saved[0].name.split("-")[1])
    assert 1 <= step < 40
    assert f"interrupted: saved {saved[0]}" in output
    assert "continue with: llama-ft sft recipes/tiny.yaml" in output and "--resume" in output
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()

    result = cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 40 and metrics["resumed_from"] == str(saved[0])
    assert [s for s, _ in metrics["loss_history"]][:2] == [1, 2]  # the steps before the interrupt are kept


@pytest.mark.e2e
def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(*sft_args(out, "--set", "train.max_steps=400", "--set", "train.save_steps=1000"))
    wait_for(lambda: "loss=" in proc.output, proc, "the first logged loss")
    proc.send_signal(signal.SIGTERM)  # what a preempted VM or a scheduler sends before SIGKILL
    code, output = finish(proc)
    assert code == 128 + signal.SIGTERM and "interrupted: saved" in output, output[-3000:]
    assert [(c / "trainer_state.json").is_file() for c in out.glob("checkpoint-*")] == [True]


@pytest.mark.e2e
def test_a_second_ctrl_c_aborts_without_saving(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(*sft_args(out, "--set", "train.max_steps=400", "--set", "train.save_steps=1000"))
    wait_for(lambda: "loss=" in proc.output, proc, "the first logged loss")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code, output = finish(proc)
    assert code == 130 and "aborted" in output, output[-3000:]
    assert "Traceback" not in output
    assert not (out / "metrics.json").exists()


@pytest.mark.e2e
def test_resume_refuses_changed_data_and_a_changed_lora_shape(tmp_path):
    data = tmp_path / "chat.jsonl"
    shutil.copy(ROOT / "datasets" / "tiny_chat.jsonl", data)
    out = tmp_path / "run"
    args = sft_args(out, "--set", "train.max_steps=40", "--set", "train.save_steps=2", "--set", f"data.train={data}")
    proc = start_cli(*args)
    wait_for(lambda: (out / "checkpoint-2" / "trainer_state.json").exists(), proc, "checkpoint-2")
    proc.send_signal(signal.SIGKILL)
    finish(proc)

    with data.open("a") as f:  # one more row: the checkpoint's data order no longer applies
        f.write(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}) + "\n")
    result = cli(*args, "--resume")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"data file {data} changed since the run started" in result.stderr and "Traceback" not in result.stderr

    result = cli(*args, "--set", "lora.r=8", "--resume")
    assert result.returncode == 2 and "lora.r: 16 there, 8 now" in result.stderr


def test_lora_shape_is_checked_against_the_checkpoint_itself(tmp_path):
    from ft import recipe, runs

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 32, "target_modules": ["q_proj"]}))
    loaded = recipe.load(ROOT / "recipes" / "tiny.yaml")
    problems = runs.lora_mismatch(tmp_path, loaded)
    assert any(p.startswith("lora.r: 8 in") for p in problems) and any("lora.target_modules" in p for p in problems)


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:  # root writes through permissions; sysfs refuses it anyway
        out = Path("/sys/llama-ft-test/run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "run"
    result = cli(*sft_args(out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"output_dir {out}: cannot write there" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_full_disk_while_saving_is_a_clear_error_and_nothing_looks_finished(tmp_path, tiny_dir):
    out = tmp_path / "run"

    def small_files_only():  # the file-size limit makes any bigger write fail, as a full disk would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *sft_args(out, "--set", "train.max_steps=4",
                                                                             "--set", "train.save_steps=2")],
                            cwd=ROOT, env={**os.environ}, capture_output=True, text=True, preexec_fn=small_files_only)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: disk or permission problem: " in result.stderr and "Traceback" not in result.stderr
    assert not (out / "metrics.json").exists()
    assert not any((c / "trainer_state.json").exists() for c in out.glob("checkpoint-*"))


def test_trust_remote_code_is_off_unless_the_recipe_says_so_and_then_warns(tiny_dir, capsys):
    from ft import models, recipe

    loaded = recipe.load(ROOT / "recipes" / "tiny.yaml")
    assert loaded.model.trust_remote_code is False
    models.load_tokenizer(loaded.model.name)
    assert "trust_remote_code" not in capsys.readouterr().err
    trusting = recipe.load(ROOT / "recipes" / "tiny.yaml", ["model.trust_remote_code=true"])
    models.load_tokenizer(trusting.model.name, trust_remote_code=trusting.model.trust_remote_code)
    assert "warning: model.trust_remote_code is true" in capsys.readouterr().err


class _Payload:
    """A pickle that runs code when unpickled: what a tampered checkpoint could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.e2e
def test_a_tampered_checkpoint_cannot_run_code_on_resume(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    args = sft_args(out, "--set", "train.max_steps=40", "--set", "train.save_steps=2")
    proc = start_cli(*args)
    wait_for(lambda: (out / "checkpoint-2" / "trainer_state.json").exists(), proc, "checkpoint-2")
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    checkpoint = Path(sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1])
    torch.save({"state": _Payload(marker)}, checkpoint / "rng_state.pth")  # torch.save pickles the payload
    result = cli(*args, "--resume")
    assert result.returncode == 2 and "refused to load a file that holds more than tensors" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()  # torch.load(weights_only=True) refused to build the object


@pytest.mark.e2e
def test_a_dpo_run_after_an_sft_at_r64_resumes_and_its_card_says_r64(tmp_path, tiny_dir):
    """lora: has one meaning: a run that continues model.adapter trains the adapter's saved shape, so the default
    lora: (r=16) neither blocks --resume ("lora.r: 64 in checkpoint-N, 16 now") nor shows in the card; a lora: key set
    against the saved shape is refused, naming both."""
    import ft
    from ft import hub, runs
    from ft.errors import UserError

    quick = ["train.logging_steps=1", "train.generate_samples=0", "train.report_to=none", "train.max_steps=2",
             "train.save_steps=1"]
    sft = ft.run_stage("sft", ROOT / "recipes" / "tiny.yaml", output_dir=tmp_path / "sft", say=lambda m: None,
                       overrides=[*quick, "lora.r=64", "lora.alpha=128"])
    dpo = ["model.name=builtin:tiny-llama-2", f"model.adapter={sft}", "data.train=datasets/tiny_dpo.jsonl",
           "data.eval=null", "data.skip_invalid=false", "train.gradient_accumulation_steps=1",
           "train.gradient_checkpointing=false", "train.batch_size=2", *quick]
    out = ft.run_stage("dpo", ROOT / "recipes" / "dpo.yaml", output_dir=tmp_path / "dpo", overrides=dpo,
                       say=lambda m: None)
    assert runs.lora_shape(out).r == 64 and runs.read_recipe(out).lora.r == 64  # recipe.yaml records what was trained
    # as a run killed after its first checkpoint leaves it: checkpoint-1, no final adapter, no metrics.json
    shutil.rmtree(out / "checkpoint-2")
    for name in ("metrics.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    ft.run_stage("dpo", ROOT / "recipes" / "dpo.yaml", output_dir=out, overrides=dpo, resume=True, say=lambda m: None)
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    card = hub.model_card(out, "alice/tiny-dpo")
    assert "LoRA r=64, alpha=128," in card and "r=16" not in card

    with pytest.raises(UserError, match=r"lora\.r: 16 in the recipe, 64 in model\.adapter"):
        ft.run_stage("dpo", ROOT / "recipes" / "dpo.yaml", output_dir=tmp_path / "dpo2", overrides=[*dpo, "lora.r=16"])
    assert not (tmp_path / "dpo2").exists()
