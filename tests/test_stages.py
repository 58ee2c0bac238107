"""The stage registry: every stage is declared once, its command is made from the declaration and takes the common
flags, and `ft.run_stage` trains from Python as the CLI does."""

import json
import sys

import pytest
import yaml
from typer.testing import CliRunner

import ft
from ft import recipe as recipe_mod
from ft.cli import app
from ft.errors import UserError
from ft.stages.registry import STAGES, Stage

from conftest import ROOT

RECIPE_OF = {"sft": "recipes/tiny.yaml", "reward": "recipes/reward-helpful.yaml", "dpo": "recipes/dpo.yaml",
             "rejection": "recipes/rejection.yaml", "ppo": "recipes/ppo.yaml", "gatt": "recipes/gatt.yaml"}
TINY_MODEL = ["--set", "model.name=builtin:tiny-llama-2"]


def test_every_declared_stage_has_a_module_a_command_and_a_recipe_name():
    import importlib

    from ft import plan

    commands = {c.name for c in app.registered_commands}
    assert set(STAGES) == set(RECIPE_OF) == set(plan.STAGES) and set(STAGES) <= commands
    for name, stage in STAGES.items():
        assert callable(importlib.import_module(f"ft.stages.{name}").run), name
        assert recipe_mod.load(RECIPE_OF[name]).stage == name
        if stage.section:  # only its own recipes may hold its section: an sft recipe with it is refused
            raw = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
            raw[stage.section] = getattr(recipe_mod.load(RECIPE_OF[name]), stage.section).model_dump(mode="json")
            with pytest.raises(UserError, match=f"section '{stage.section}' belongs to stage {name}, but this "
                                                "recipe's stage is sft"):
                recipe_mod.validate(raw)


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, result.exception


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_command_takes_the_common_flags(stage, tmp_path):
    out = tmp_path / "fresh"
    # --set reaches the recipe: an unknown key is named
    _, error = _invoke(stage, RECIPE_OF[stage], "--set", "train.bogus_key=1")
    assert isinstance(error, UserError) and "train.bogus_key" in str(error), error
    # --output-dir, --resume and --force are taken; resuming where nothing ran is refused by name
    _, error = _invoke(stage, RECIPE_OF[stage], *TINY_MODEL, "--output-dir", out, "--resume", "--force")
    assert isinstance(error, UserError), error
    if STAGES[stage].resumable:
        assert f"output_dir {out}: --resume given but there is no earlier run there" in str(error)
    else:
        assert f"llama-ft {stage} cannot resume" in str(error) and f"llama-ft sft {out / 'sft'}/recipe.yaml --resume" in str(error)
    assert not out.exists()  # refused before anything was written
    # a recipe for another stage is refused with the command that runs it
    other = "dpo" if stage != "dpo" else "sft"
    _, error = _invoke(stage, RECIPE_OF[other], *TINY_MODEL)
    assert isinstance(error, UserError) and f"run it with `llama-ft {other}`" in str(error), error


def test_only_sampling_stages_take_no_train():
    for name, stage in STAGES.items():
        result, _ = _invoke(name, "--help")
        assert ("--no-train" in result.output) == bool(stage.then_sft), name
        for flag in ("--set", "--output-dir", "--resume", "--force"):
            assert flag in result.output, (name, flag)


@pytest.mark.e2e
def test_run_stage_trains_the_tiny_recipe_from_python(tmp_path, tiny_dir):
    said = []
    out = ft.run_stage("sft", "recipes/tiny.yaml", overrides=["train.max_steps=3", "train.report_to=none"],
                       output_dir=tmp_path / "run", say=said.append)
    assert out == tmp_path / "run"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3
    assert said == [f"\ndone: the adapter is in {out}\nnext: llama-ft merge {out} --output <dir>"]
    with pytest.raises(UserError, match="already finished"):
        ft.run_stage("sft", "recipes/tiny.yaml", output_dir=out, overrides=["train.max_steps=3", "train.report_to=none"],
                     resume=True, say=said.append)


def test_the_commands_are_the_documented_ones():
    """The CLI's commands and the rows of docs/commands.md and of README.md's Commands table are the same set: a
    command added, renamed or lost is caught either way (the stage commands come from the registry)."""
    import re

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    for page in ("docs/commands.md", "README.md"):
        rows = set(re.findall(r"^\| `llama-ft ([a-z-]+)", (ROOT / page).read_text(encoding="utf-8"), re.M))
        assert rows == commands, f"{page}: rows without a command {sorted(rows - commands)}, commands without a row " \
                                 f"{sorted(commands - rows)}"


@pytest.mark.e2e
def test_a_stage_is_one_registry_entry_and_one_module(tmp_path, tiny_dir, monkeypatch):
    """A toy stage (tests/toy_stage.py), registered here and nowhere else, runs through ft.run_stage and the CLI: its
    recipe validates, its command takes the common flags, its run folder and metrics follow the stage skeleton."""
    sys.path.insert(0, str(ROOT / "tests"))
    import toy_stage
    from ft import cli

    toy = Stage("toy", "Count the tokens of each role in the data (a test-only stage).", data_kind="dialogs",
                multi_process=False, resumable=False)
    monkeypatch.setitem(STAGES, "toy", toy)
    monkeypatch.setitem(sys.modules, "ft.stages.toy", toy_stage)
    monkeypatch.setattr(cli.app, "registered_commands", list(cli.app.registered_commands))  # restored afterwards
    cli.add_stage_command(toy)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"stage: toy\nmodel: {{name: builtin:tiny-llama-2}}\n"
                      f"data: {{train: {ROOT / 'datasets' / 'tiny_chat.jsonl'}}}\noutput_dir: {tmp_path / 'run'}\n")

    said = []
    out = ft.run_stage("toy", recipe, say=said.append)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage"] == "toy" and metrics["tokens"]["assistant"] > 0 and metrics["dialogs"] > 0
    assert metrics["peak_memory_bytes"] > 0 and metrics["train_seconds"] >= 0  # the skeleton's measured section
    assert json.loads((out / "tokens.json").read_text()) == metrics["tokens"]
    assert recipe_mod.load(out / "recipe.yaml").stage == "toy" and said == [f"\ndone: the run is in {out}"]

    result = CliRunner().invoke(cli.app, ["toy", str(recipe), "--output-dir", str(tmp_path / "cli-run"),
                                          "--set", "data.max_length=256"])
    assert result.exit_code == 0, result.output
    assert f"done: the run is in {tmp_path / 'cli-run'}" in result.output
    assert json.loads((tmp_path / "cli-run" / "metrics.json").read_text())["tokens"] == metrics["tokens"]
    result = CliRunner().invoke(cli.app, ["toy", str(recipe), "--output-dir", str(tmp_path / "x"), "--resume"])
    assert isinstance(result.exception, UserError) and "llama-ft toy cannot resume" in str(result.exception)
