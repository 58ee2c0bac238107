"""The recipes and sample data shipped with llama-ft, found the same way in a clone and in any install.

The repository keeps them at its top, `recipes/` and `datasets/`: the single source. A wheel or sdist
maps those folders into the package as `ft/_shipped/recipes/` and `ft/_shipped/datasets/`
(pyproject.toml's package-dir), so `pip install git+...` brings them along; a clone, an editable
install and `python cli.py` use the folders at the top of the repository. `datasets/` never gets an
`__init__.py`: `import datasets` stays Hugging Face's.

A recipe argument that is not an existing file but names a shipped recipe (`tiny`, `chat.yaml`,
`recipes/chat.yaml`) is the shipped one. When a shipped recipe runs, a relative data path that does
not exist in the current directory but names a shipped sample file (`datasets/tiny_chat.jsonl`) is
that file; a user's own recipe keeps paths relative to the current directory.

A leaf: it imports nothing of llama-ft but its errors (ft.recipe reads it; `llama-ft recipes --copy` is
ft.recipe_copy.copy_recipe).
"""

from __future__ import annotations

from pathlib import Path

from ft.errors import UserError

PACKAGE = Path(__file__).resolve().parent


def root() -> Path:
    """The folder holding recipes/ and datasets/: inside the installed package, else the clone ft/ lives in."""
    for candidate in (PACKAGE / "_shipped", PACKAGE.parent):
        if (candidate / "recipes").is_dir() and (candidate / "datasets").is_dir():
            return candidate
    raise UserError(f"no shipped recipes next to {PACKAGE} (a broken install? reinstall llama-ft)")


def recipes() -> list[Path]:
    return sorted((root() / "recipes").glob("*.yaml"))


def find_recipe(name: str | Path) -> Path | None:
    """The shipped recipe `name` names (tiny, tiny.yaml or recipes/tiny.yaml), or None."""
    path = Path(name)
    if path.parent not in (Path("."), Path("recipes")) or not path.name:
        return None
    file = root() / "recipes" / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return file if file.is_file() else None


def is_shipped(recipe_file: Path) -> bool:
    """Whether `recipe_file` is one of the shipped recipes (in a clone: the files in its recipes/)."""
    try:
        return recipe_file.resolve().parent == (root() / "recipes").resolve()
    except UserError:
        return False


def sample_file(path: str) -> Path | None:
    """The shipped sample file a shipped recipe's relative `path` names, when `path` is not in the current
    directory (a run outside a clone); None otherwise."""
    relative = Path(path)
    if relative.is_absolute() or path.startswith("~") or relative.exists():
        return None
    base = root().resolve()
    candidate = (base / relative).resolve()
    return candidate if candidate.is_file() and base in candidate.parents else None


def names() -> str:
    return ", ".join(p.stem for p in recipes())
