"""The same commands under torchrun and accelerate launch: 2 CPU processes over gloo (OMP_NUM_THREADS=1)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import cli, ROOT, run_cli, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["--set", "train.report_to=none", "--set", "train.generate_samples=0"]


def torchrun(*args, processes=2, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                           "-m", "ft", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def accelerate(*args, config="configs/accelerate/ddp.yaml", timeout=600):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                           "--main_process_port", str(port), "-m", "ft", *map(str, args)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def equal_length_data(tokenizer, tmp_path_factory):
    """32 single-turn dialogs that all tokenize to the same length (packed two per 2 x L row): no padding anywhere,
    so one process at batch 8 and two at batch 4 see exactly the same tokens per optimiser step."""
    rng = random.Random(0)
    words = "the a cat dog says red blue green capital city sky grass".split()
    by_length = {}
    for _ in range(4000):
        messages = [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(4)) + "?"},
                    {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(5)) + "."}]
        length = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        by_length.setdefault(length, []).append({"messages": messages})
    length, rows = max(by_length.items(), key=lambda kv: len(kv[1]))
    assert len(rows) >= 32
    path = write_jsonl(tmp_path_factory.mktemp("equal") / "equal.jsonl", rows[:32])
    return path, length


@pytest.mark.e2e
def test_one_process_at_batch_8_equals_two_at_batch_4(equal_length_data, tmp_path):
    path, length = equal_length_data
    common = ["--set", f"data.train={path}", "--set", f"data.max_length={2 * length}", "--set", "train.max_steps=6",
              "--set", "train.learning_rate=1e-3", "--set", "train.logging_steps=1", "--set", "train.warmup_ratio=0", *FAST]
    one = run_cli("sft", "recipes/tiny.yaml", "--output-dir", tmp_path / "one", "--set", "train.batch_size=8", *common,
                  env={"OMP_NUM_THREADS": "1"})
    two = torchrun("sft", "recipes/tiny.yaml", "--output-dir", tmp_path / "two", "--set", "train.batch_size=4", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (a["world_size"], a["effective_batch"], b["world_size"], b["effective_batch"]) == (1, 8, 2, 8)
    assert a["data"]["train"]["packed_rows"] == b["data"]["train"]["packed_rows"] == 16
    losses_a, losses_b = [loss for _, loss in a["loss_history"]], [loss for _, loss in b["loss_history"]]
    assert len(losses_a) == len(losses_b) == 6 and max(abs(x - y) for x, y in zip(losses_a, losses_b)) < 1e-5
    x, y = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert x.keys() == y.keys() and max((x[k] - y[k]).abs().max().item() for k in x) < 1e-5


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """recipes/tiny.yaml (4-bit QLoRA) under accelerate launch with the shipped DDP config: 2 processes, 2 packs each."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = accelerate("sft", "recipes/tiny.yaml", "--output-dir", out, "--set", "train.batch_size=2",
                        "--set", "train.save_steps=20", "--set", "train.report_to=none")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_a_2_process_qlora_run_learns_and_writes_one_complete_run_folder(two_process_run):
    out, result = two_process_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch"] == 4  # two processes really trained together
    assert metrics["loss_last"] < 0.1 * metrics["loss_first"]
    assert metrics["samples"]["exact_match"] >= 6, metrics["samples"]  # the main process answers as taught
    assert result.stdout.count("done: the adapter is in") == 1 and result.stdout.count("greedy answers matching") == 1
    assert result.stdout.count("effective batch: 2 per device x 1 accumulation x 2 processes = 4") == 1
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                     "checkpoint-100", "checkpoint-60", "checkpoint-80", "inputs.json", "metrics.json", "recipe.yaml",
                     "tokenizer.json", "tokenizer_config.json"], names
    assert json.loads((out / "inputs.json").read_text())["processes"] == "2"
    merged = run_cli("merge", out, "--output", out.parent / "merged")  # merge stays one process, same adapter format
    assert merged.returncode == 0, merged.stderr[-2000:]
    chat = cli("chat", out.parent / "merged", "--prompt", "What is the capital of Peru?", "--temperature", "0",
                   "--max-new-tokens", "16")
    assert chat.returncode == 0 and chat.stdout.strip() == "The capital of Peru is Lima.", chat.stdout + chat.stderr[-1500:]


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.slow  # ~75 s; 2-process training, its run folder and the batch equivalence stay in the default suite
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_equals_the_uninterrupted_run(two_process_run, tmp_path):
    full, _ = two_process_run
    out = tmp_path / "run"
    args = ["sft", "recipes/tiny.yaml", "--output-dir", out, "--set", "train.batch_size=2", "--set", "train.save_steps=20",
            "--set", "train.report_to=none"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "-m", "ft", *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-20" / "trainer_state.json").is_file() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    worker = _rank_pid(launcher.pid, 1)
    assert worker is not None
    os.kill(worker, signal.SIGTERM)  # one rank only, as a preemption notice might reach one process
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode != 0 and "exitcode  : 143" in stderr, stderr[-3000:]  # both ranks exit 143
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    stopped = max(int(c.split("-")[1]) for c in checkpoints)
    assert 20 < stopped < 100 and not (out / "metrics.json").exists()
    assert "continue with: llama-ft sft recipes/tiny.yaml" in stderr and stderr.count("continue with:") == 1
    state = json.loads((out / f"checkpoint-{stopped}" / "trainer_state.json").read_text())
    assert state["global_step"] == stopped  # one checkpoint, at the step both ranks stopped at

    one = cli(*args, "--resume")  # another number of processes would change the batches: refused
    assert one.returncode == 2 and "processes changed since the run started (2 then, 1 now)" in one.stderr, one.stderr
    resumed = torchrun(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    x, y = adapter(full), adapter(out)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)  # bit-exact on the CPU
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, out))
    logged = dict(map(tuple, b["loss_history"]))
    first_after = min(step for step, _ in a["loss_history"] if step > stopped)  # averages since the interrupt's own entry
    assert all(logged[step] == loss for step, loss in a["loss_history"] if step != first_after)
    assert stopped in logged  # the interrupt logs the loss since the last entry



@pytest.mark.e2e
def test_stages_that_run_in_one_process_refuse_several(tmp_path):
    result = torchrun("ppo", "recipes/ppo.yaml", "--output-dir", tmp_path / "x")
    assert result.returncode != 0 and "llama-ft ppo runs in one process" in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("error: llama-ft ppo runs in one process") == 1 and not (tmp_path / "x").exists()


def _known_accelerate_keys() -> dict[str, set[str]]:
    """Every key accelerate 1.15 reads from a config file: ClusterConfig's fields (plus two legacy names it rewrites)
    at the top; under fsdp_config and deepspeed_config, the launcher's FSDP and DeepSpeed options (accelerate copies
    those sections onto its argparse namespace and silently ignores any other key)."""
    import dataclasses

    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    groups = {g.title: {a.dest for a in g._group_actions} for g in launch_command_parser()._action_groups}
    return {"top": {f.name for f in dataclasses.fields(ClusterConfig)} | {"fp16", "dynamo_backend"},
            "fsdp_config": groups["FSDP Arguments"] | {"fsdp_ignored_modules"},
            "deepspeed_config": groups["DeepSpeed Arguments"]}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_key_of_the_shipped_accelerate_configs_is_one_accelerate_knows(path):
    from accelerate.commands.config.config_args import load_config_from_file

    known = _known_accelerate_keys()
    config = yaml.safe_load(path.read_text())
    header = "\n".join(line for line in path.read_text().splitlines()[:12] if line.startswith("#"))
    assert "Command: accelerate launch --config_file configs/accelerate/" + path.name in header
    unknown = [k for k in config if k not in known["top"]]
    unknown += [f"fsdp_config.{k}" for k in config.get("fsdp_config") or {}
                if (k if k.startswith("fsdp_") else f"fsdp_{k}") not in known["fsdp_config"]]  # accelerate's prefixing
    unknown += [f"deepspeed_config.{k}" for k in config.get("deepspeed_config") or {} if k not in known["deepspeed_config"]]
    assert unknown == []
    load_config_from_file(str(path))  # accelerate's own loader accepts it
    assert known["fsdp_config"] >= {"fsdp_version", "fsdp_offload_params"} and "fsdp_cpu_offload" not in known["fsdp_config"]
