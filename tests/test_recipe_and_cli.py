"""Recipes are strict at the edges; the CLI maps user errors to exit 2 with a message, never a traceback."""

import subprocess
import sys

import pytest
import yaml

from conftest import cli, ROOT, run_cli
from ft import recipe
from ft.errors import UserError

MINIMAL = {"model": {"name": "builtin:tiny-llama-2"}, "data": {"train": "datasets/tiny_chat.jsonl"}, "output_dir": "runs/x"}


def write(tmp_path, raw, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.e2e
def test_help_is_fast_because_torch_is_not_imported():
    code = "import sys, ft.cli; print(any(m in sys.modules for m in ('torch', 'transformers', 'trl', 'peft')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    result = run_cli("--help")
    assert result.returncode == 0 and "sft" in result.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_says_what_gpu_and_command(path):
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines[:5] if line.startswith("#"))
    from ft import pipeline_recipe

    raw = yaml.safe_load(path.read_text())
    loaded = pipeline_recipe.load(path) if pipeline_recipe.is_pipeline(raw) else recipe.load(path)
    command = (f"llama-ft {loaded.stage} recipes/{path.name}", f"-m ft {loaded.stage} recipes/{path.name}")  # or a launcher
    assert "GPU" in header and any(c in header for c in command)
    result = cli("validate", path.relative_to(ROOT))
    assert result.returncode == 0, result.stderr


def test_unknown_key_suggests_the_closest_one(tmp_path):
    raw = {**MINIMAL, "model": {"name": "x", "quantizaton": "4bit"}}
    with pytest.raises(UserError, match=r"model\.quantizaton: unknown key \(did you mean 'quantization'\?\)"):
        recipe.load(write(tmp_path, raw))
    raw = {**MINIMAL, "data": {"train": [{"path": "a.jsonl", "fromat": "alpaca"}]}}
    with pytest.raises(UserError, match=r"data\.train\.0\.fromat: unknown key \(did you mean 'format'\?\)"):
        recipe.load(write(tmp_path, raw))


def test_wrong_types_and_values_are_named(tmp_path):
    with pytest.raises(UserError, match=r"train\.max_steps: .*integer.*'many'"):
        recipe.load(write(tmp_path, {**MINIMAL, "train": {"max_steps": "many"}}))
    with pytest.raises(UserError, match=r"model\.quantization: .*'4bit', '8bit' or 'none'"):
        recipe.load(write(tmp_path, {**MINIMAL, "model": {"name": "x", "quantization": "3bit"}}))
    with pytest.raises(UserError, match=r"output_dir: required key is missing"):
        recipe.load(write(tmp_path, {k: v for k, v in MINIMAL.items() if k != "output_dir"}))


def test_set_overrides_are_parsed_as_yaml(tmp_path):
    loaded = recipe.load(write(tmp_path, MINIMAL), ["train.max_steps=20", "data.packing=false", "lora.target_modules=[q_proj, v_proj]"])
    assert loaded.train.max_steps == 20 and loaded.data.packing is False
    assert loaded.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="expected dotted.key=value"):
        recipe.load(write(tmp_path, MINIMAL), ["train.max_steps"])
    with pytest.raises(UserError, match=r"train\.max_stesp: unknown key \(did you mean 'max_steps'\?\)"):
        recipe.load(write(tmp_path, MINIMAL), ["train.max_stesp=3"])


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        recipe.load(path)


def test_stage_sections_belong_to_their_stage(tmp_path):
    with pytest.raises(UserError, match="section 'dpo' belongs to stage dpo"):
        recipe.load(write(tmp_path, {**MINIMAL, "dpo": {"beta": 0.2}}))
    assert recipe.load(write(tmp_path, {**MINIMAL, "stage": "reward"})).reward.margin == "none"
    with pytest.raises(UserError, match=r"dpo\.betta: unknown key \(did you mean 'beta'\?\)"):
        recipe.load(write(tmp_path, {**MINIMAL, "stage": "dpo", "dpo": {"betta": 0.2}}))
    result = cli("sft", "recipes/dpo.yaml")
    assert result.returncode == 2 and "run it with `llama-ft dpo`" in result.stderr


def test_data_sources_accept_a_path_a_mapping_or_a_list(tmp_path):
    for train in ["a.jsonl", {"path": "a.jsonl", "format": "alpaca"}, ["a.jsonl", {"path": "org/ds", "split": "test"}]]:
        loaded = recipe.load(write(tmp_path, {**MINIMAL, "data": {"train": train}}))
        assert all(isinstance(s, recipe.DataSource) for s in loaded.data.train)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["sft", "no/such/recipe.yaml"], "recipe file not found"),
        (["validate", "{bad}"], "unknown key"),
        (["sft", "recipes/tiny.yaml", "--set", "train.lr=1"], "train.lr: unknown key"),
        (["sft", "recipes/tiny.yaml", "--bogus-flag"], "No such option"),
        (["validate", "recipes/tiny.yaml", "--set", "data.train=missing.jsonl"], "missing.jsonl not found"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(tmp_path, args, needle):
    if "{bad}" in args:
        args = [a if a != "{bad}" else str(write(tmp_path, {**MINIMAL, "modle": {}})) for a in args]
    result = cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_sft_recipe_with_a_missing_local_model_exits_2(tmp_path):
    result = cli("sft", "recipes/tiny.yaml", "--set", f"model.name={tmp_path}/nothing-here", "--output-dir", tmp_path / "run")
    assert result.returncode == 2
    assert "not a Hub id" in result.stderr and "Traceback" not in result.stderr


def test_recipes_lists_every_shipped_recipe():
    result = cli("recipes")
    assert result.returncode == 0
    for path in (ROOT / "recipes").glob("*.yaml"):
        assert f"recipes/{path.name}" in result.stdout


def test_every_bracket_in_a_help_text_survives_the_help_page():
    """typer renders help as rich markup, which eats a bracketed word ("pip install 'llama-ft[web]'" became
    "'llama-ft'"): every [...] of every command's and option's help must reach its --help page (escape it as \\[)."""
    import re

    import typer
    from typer.testing import CliRunner

    from ft.cli import app

    group = typer.main.get_command(app)
    checked = 0
    for name, command in group.commands.items():
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        wanted = [m.removeprefix("\\") for text in texts for m in re.findall(r"\\?\[[^\]\n]*\]", text)]
        if not wanted:
            continue
        result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
        page = " ".join(result.output.split())
        for bracketed in wanted:
            assert bracketed in page, f"llama-ft {name} --help lost {bracketed!r}"
            checked += 1
    assert checked  # chat's --web help names the [web] extra
