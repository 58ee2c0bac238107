"""notebooks/colab_t4.ipynb runs, offline on the CPU, with the built-in tiny model: it cannot rot unnoticed.

How the notebook is adapted (the cells say so in their tags, and its first cell explains it):
- cells tagged `colab` (pip install from GitHub, Google Drive, the HF_TOKEN secret, nvidia-smi) are skipped:
  they need Colab and the network; the package under test is this environment's;
- the cell tagged `parameters` is replaced: RECIPE=tiny (the shipped recipe, found by name), run and merged
  folders in a temporary folder, `--dry-run` for the push (which then sends nothing);
- the cell tagged `plan` runs when the CLI has a `plan` command, and is skipped otherwise.
The run folder starts as a run cut off after its checkpoint-80 (a Colab disconnect), so the training cell
takes its `--resume` branch; every other cell runs as a Colab user runs it.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "colab_t4.ipynb"


@pytest.mark.slow  # ~80 s; every command the notebook runs is tested in the default suite on its own
def test_colab_notebook_runs_with_the_tiny_recipe(trained_run, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from ft.cli import app

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tags = [set(cell.metadata.get("tags", [])) for cell in notebook.cells]
    assert sum("parameters" in t for t in tags) == 1 and sum("colab" in t for t in tags) == 3
    sources = "\n".join(cell.source for cell in notebook.cells)
    for command in ("pip install -q \"llama-ft @ git+", "drive.mount(", 'userdata.get("HF_TOKEN")',
                    "llama-ft plan {RECIPE} --gpu t4", 'RECIPE = "recipes/chat.yaml"', "--resume",
                    "llama-ft chat {RUN_DIR}", "llama-ft merge {RUN_DIR} --output {MERGED_DIR} --gguf",
                    "llama-ft push {MERGED_DIR} --repo-id {REPO_ID}"):
        assert command in sources, command

    has_plan = "plan" in {c.name or c.callback.__name__ for c in app.registered_commands}
    run, merged = tmp_path / "drive" / "run", tmp_path / "merged"
    shutil.copytree(trained_run[0], run)  # a run cut off after checkpoint-80, as a disconnect leaves it on Drive
    for name in ("metrics.json", "adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoint-100")
    cells = []
    for cell, cell_tags in zip(notebook.cells, tags):
        if "colab" in cell_tags or ("plan" in cell_tags and not has_plan):
            continue
        if "parameters" in cell_tags:
            cell.source = "\n".join([
                'RECIPE = "tiny"', f"RUN_DIR = {str(run)!r}", f"MERGED_DIR = {str(merged)!r}",
                'REPO_ID = "alice/tiny-chat"', 'SFT_FLAGS = "--set train.save_steps=40"', 'PUSH_FLAGS = "--dry-run"',
                'PROMPT = "What is the capital of France?"'])
        cells.append(cell)
    notebook.cells = cells

    # the kernel runs `!llama-ft`: this environment's console script, from the clone (as the trained run was)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()

    text = "\n".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []) if o.get("name"))
    assert "resuming from" in text and "checkpoint-80" in text, text[-3000:]
    assert (run / "metrics.json").is_file() and (merged / "model-q8_0.gguf").is_file()
    assert text.count("The capital of France is Paris.") >= 2  # the adapter's answer and the merged model's
    assert "would upload to alice/tiny-chat" in text and "model-f16.gguf" in text
