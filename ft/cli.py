"""The llama-ft command line: one thin command per verb.

Nothing heavy is imported at module level, so `llama-ft --help` and `llama-ft validate` answer
at once. Exit codes: 0 success, 2 a user error (a message on stderr, no traceback), 1 a bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ft.errors import UserError

app = typer.Typer(
    help="Fine-tune Llama 2 with QLoRA on one small GPU. Recipes are YAML files; see `llama-ft recipes`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

SetOption = typer.Option(None, "--set", help="Override a recipe key, parsed as YAML: --set train.max_steps=20")


def _load(recipe_path: Path, overrides: Optional[List[str]], output_dir: Optional[Path]):
    from ft import recipe as recipe_mod

    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    return recipe_mod.load(recipe_path, overrides)


@app.command()
def sft(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    set_: Optional[List[str]] = SetOption,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Overrides output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last checkpoint."),
):
    """Supervised fine-tuning: train a LoRA adapter on chat data (loss on the answers only)."""
    loaded = _load(recipe, set_, output_dir)
    if loaded.stage != "sft":
        raise UserError(f"{recipe}: this is a {loaded.stage} recipe; run it with `llama-ft {loaded.stage}`")
    from ft.stages import sft as stage

    stage.run(loaded, resume=resume)
    typer.echo(f"\ndone: the adapter is in {loaded.output_dir}\nnext: llama-ft merge {loaded.output_dir} --output <dir>")


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    set_: Optional[List[str]] = SetOption,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir"),
):
    """Check a recipe (keys, types, data files present) without loading any model; print it resolved."""
    from ft import recipe as recipe_mod

    loaded = _load(recipe, set_, output_dir)
    for source in loaded.data.train + (loaded.data.eval or []):
        path = Path(source.path).expanduser()
        looks_local = source.path.startswith((".", "/", "~")) or Path(source.path).suffix or source.path.count("/") != 1
        if looks_local and not path.exists():
            raise UserError(f"{recipe}: data file {source.path} not found (paths are relative to the current directory)")
    typer.echo(recipe_mod.dump(loaded), nl=False)
    typer.echo(f"# {recipe}: valid {loaded.stage} recipe", err=True)


@app.command()
def recipes():
    """List the shipped recipes, one line each."""
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        typer.echo(f"{str(path.relative_to(RECIPES_DIR.parent)):<28} {first.lstrip('# ').strip()}")


@app.command()
def keys():
    """Every recipe key with its default and meaning."""
    from ft.recipe import field_docs

    for key, default, doc in field_docs():
        typer.echo(f"{key:<34} {default:<14} {doc}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code if isinstance(code, int) else 1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # bad flag, missing argument: typer's (click's) usage errors
        if hasattr(e, "show"):
            e.show()
        else:
            typer.echo(f"error: {e}", err=True)
        sys.exit(2)
