"""The stage registry: every stage is declared once, its command is made from the declaration and takes the common
flags, and `ft.run_stage` trains from Python as the CLI does."""

import json

import pytest
from typer.testing import CliRunner

import ft
from ft import recipe as recipe_mod
from ft.cli import app
from ft.errors import UserError
from ft.stages.registry import STAGES

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
        if stage.section:  # only its own recipes may hold its section
            assert recipe_mod.STAGE_SECTIONS[stage.section] == name


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


def test_every_command_is_documented_in_the_commands_page():
    from conftest import ROOT

    page = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in (c.name or c.callback.__name__ for c in app.registered_commands):
        assert f"| `llama-ft {name}" in page, f"docs/commands.md has no row for llama-ft {name}"
        assert f"| `llama-ft {name}" in readme, f"README.md's Commands table has no row for llama-ft {name}"
