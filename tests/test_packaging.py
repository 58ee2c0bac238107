"""A plain install works as a clone does: the sdist and wheel built from this checkout carry the recipes and
sample data, and the installed package, run from a folder outside the clone, lists, copies and trains them."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SHIPPED = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
SAMPLES = sorted(p.name for p in (ROOT / "datasets").iterdir() if p.is_file())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """sdist and wheel (the wheel built from the sdist, as pip does from an index) from the checkout."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [sdist], [wheel] = out.glob("*.tar.gz"), out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """The wheel installed into a folder of its own (the dependencies are this environment's), and a working
    folder outside the clone to run it from."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(built[1])], check=True, capture_output=True, timeout=300)
    work = tmp_path_factory.mktemp("elsewhere")
    assert ROOT not in work.parents
    return target, work


def run_installed(installed, *args, module=True):
    """`python -m ft ARGS` (or the installed console script) with only the installed package importable as ft."""
    target, work = installed
    command = [sys.executable, "-m", "ft", *args] if module else [sys.executable, str(target / "bin" / "llama-ft"), *args]
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def test_sdist_and_wheel_carry_recipes_and_samples_and_every_module(built):
    sdist, wheel = built
    with tarfile.open(sdist) as tar:
        in_sdist = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
    assert {f"recipes/{n}" for n in SHIPPED} | {f"datasets/{n}" for n in SAMPLES} <= in_sdist
    assert {f"ft/_shipped/recipes/{n}" for n in SHIPPED} | {f"ft/_shipped/datasets/{n}" for n in SAMPLES} <= in_wheel
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ft").rglob("*.py")}
    assert modules <= in_wheel, f"not in the wheel (list the package in pyproject.toml): {modules - in_wheel}"
    assert not [n for n in in_wheel | in_sdist if n.endswith("datasets/__init__.py")]  # `import datasets` is HF's
    assert (ROOT / "ft" / "_shipped").exists() is False  # mapped at build time, never a second copy in the clone


def test_installed_package_lists_copies_and_trains_the_shipped_recipes(installed, llama_ft_home):
    target, work = installed
    where = subprocess.run([sys.executable, "-c", "import ft, datasets; print(ft.__file__); print(datasets.__file__)"],
                           cwd=work, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    ft_file, datasets_file = where.stdout.split()
    assert Path(ft_file).is_relative_to(target) and "site-packages" in datasets_file  # not the clone's, and HF's

    listed = run_installed(installed, "recipes", module=False)  # the console script
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [f"recipes/{n}" for n in SHIPPED]

    copied = run_installed(installed, "recipes", "--copy", "tiny", "mine.yaml")
    assert copied.returncode == 0, copied.stderr
    assert (work / "mine.yaml").read_text() == (ROOT / "recipes" / "tiny.yaml").read_text()
    assert (work / "datasets" / "tiny_chat.jsonl").read_bytes() == (ROOT / "datasets" / "tiny_chat.jsonl").read_bytes()
    again = run_installed(installed, "recipes", "--copy", "tiny", "mine.yaml")
    assert again.returncode == 2 and "already exists" in again.stderr
    edited = work / "mine.yaml"  # an editable file: the user's own recipe, paths relative to the current directory
    edited.write_text(edited.read_text().replace("max_steps: 100", "max_steps: 7"))
    checked = run_installed(installed, "validate", "mine.yaml")
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(checked.stdout)
    assert resolved["train"]["max_steps"] == 7 and resolved["data"]["train"][0]["path"] == "datasets/tiny_chat.jsonl"

    (work / "datasets" / "tiny_chat.jsonl").unlink()  # outside a clone: the shipped recipe finds its packaged data
    trained = run_installed(installed, "sft", "tiny", "--set", "train.max_steps=3", "--set", "train.generate_samples=0",
                            "--set", "train.report_to=none")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "using the shipped recipe tiny.yaml" in trained.stderr
    assert "train data: 28 rows read, 28 examples kept" in trained.stdout and "next: llama-ft merge runs/tiny" in trained.stdout
    run = yaml.safe_load((work / "runs" / "tiny" / "recipe.yaml").read_text())
    assert Path(run["data"]["train"][0]["path"]) == target / "ft" / "_shipped" / "datasets" / "tiny_chat.jsonl"
    assert (work / "runs" / "tiny" / "metrics.json").is_file()

    mine = run_installed(installed, "validate", "mine.yaml")  # the user's recipe does not fall back to packaged data
    assert mine.returncode == 2 and "datasets/tiny_chat.jsonl not found" in mine.stderr


def test_unknown_recipe_name_lists_the_shipped_ones(installed):
    result = run_installed(installed, "sft", "nope")
    assert result.returncode == 2 and "nope: recipe file not found (shipped recipes, usable by name: chat" in result.stderr
    result = run_installed(installed, "recipes", "--copy", "nope")
    assert result.returncode == 2 and "no shipped recipe of that name" in result.stderr
