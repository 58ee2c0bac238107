"""Offline, CPU-only test setup: no Hub access, the built-in tiny model built once per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def llama_ft_home(tmp_path_factory):
    """A private cache for the tiny model, shared by the whole session (and by CLI subprocesses)."""
    home = tmp_path_factory.mktemp("llama-ft-home")
    os.environ["LLAMA_FT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dir(llama_ft_home):
    from ft import tiny

    return tiny.path()


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from ft import models, tiny

    return models.load_tokenizer(tiny.NAME)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dir):
    """recipes/tiny.yaml trained through the CLI (4-bit QLoRA, 100 steps): a finished run folder. DeprecationWarnings
    are shown (Python hides those not raised in __main__), so the demo's output test sees any from llama-ft's calls."""
    out = tmp_path_factory.mktemp("sft") / "run"
    result = run_cli("sft", "recipes/tiny.yaml", "--output-dir", out, "--set", "train.save_steps=40",
                     env={"PYTHONWARNINGS": "default::DeprecationWarning"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="session")
def merged(trained_run, tmp_path_factory):
    """The trained run merged into float16 weights, with GGUF files."""
    run, _ = trained_run
    out = tmp_path_factory.mktemp("merge") / "merged"
    result = run_cli("merge", run, "--output", out, "--gguf")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, out


# --set flags that run a 7B recipe on the built-in tiny model, quickly
TINY = ["--set", "model.name=builtin:tiny-llama-2", "--set", "train.gradient_accumulation_steps=1",
        "--set", "train.gradient_checkpointing=false", "--set", "data.skip_invalid=false", "--set", "train.report_to=none"]


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory, tiny_dir):
    """recipes/reward-helpful.yaml on the tiny model and datasets/tiny_prefs.jsonl: a finished reward-model run."""
    out = tmp_path_factory.mktemp("reward") / "run"
    result = run_cli("reward", "recipes/reward-helpful.yaml", "--output-dir", out, *TINY,
                     "--set", "data.train=datasets/tiny_prefs.jsonl", "--set", "data.eval=datasets/tiny_prefs_eval.jsonl",
                     "--set", "train.max_steps=60", "--set", "train.learning_rate=1e-3", "--set", "train.batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def run_cli(*args, cwd=ROOT, timeout=600, env=None):
    """Run `python cli.py ARGS` as a user would (with `env` added to the environment); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
