"""The documentation stays true to the code: the recipe-key page is the schema's own output, the site builds
under `mkdocs build --strict` (no broken page link or anchor, no page left out of the nav), and the README's links
into docs/ name files that exist."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import cli, ROOT


def test_recipe_keys_page_is_the_schema_output():
    result = cli("keys", "--markdown")
    assert result.returncode == 0, result.stderr[-3000:]
    committed = (ROOT / "docs" / "recipe-keys.md").read_text(encoding="utf-8")
    assert committed == result.stdout, (
        "docs/recipe-keys.md is out of date with the recipe schema (ft/recipe.py); regenerate it with:\n"
        "  python cli.py keys --markdown > docs/recipe-keys.md")


def test_recipe_keys_page_lists_every_key_with_type_and_default():
    from ft.recipe import GAttSection, PPOSection
    from ft.recipe_keys import field_docs

    page = (ROOT / "docs" / "recipe-keys.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2).split(" | ") for m in re.finditer(r"^\| `([a-z0-9_.]+)` \| (.*) \|$", page, re.M)}
    keys = [key for key, _, _ in field_docs()]
    assert [k for k in keys if k not in rows] == []
    assert [f"ppo.{name}" for name in PPOSection.model_fields if f"ppo.{name}" not in rows] == []
    assert [f"gatt.{name}" for name in GAttSection.model_fields if f"gatt.{name}" not in rows] == []
    assert rows["ppo.kl_coef"][:2] == ["number (≥ 0)", "`0.01`"]
    assert rows["gatt.batch_size"][:2] == ["integer (> 0)", "`8`"]
    assert rows["model.quantization"][:2] == ["one of `4bit`, `8bit`, `none`", "`4bit`"]
    assert rows["rejection.reward_model"][1] == "required"
    assert all(cells[-1].strip() for cells in rows.values()), "a key without a description"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs / mkdocs-material not installed: pip install -e '.[docs]' (make test installs it)")
def test_site_builds_strict_and_offline(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # no end-of-life banner
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pages = list((tmp_path / "site").rglob("*.html"))
    assert len(pages) >= 17
    for page in pages:  # theme.font: false: no page loads Google's fonts
        assert "fonts.googleapis" not in page.read_text(encoding="utf-8"), page


def test_readme_links_into_docs_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]*)", readme)
    assert len(targets) >= 15
    missing = sorted({t for t in targets if not (ROOT / t).is_file()})
    assert missing == [], f"README.md links to missing docs pages: {missing}"
