"""The run folder: what a stage writes, and what later commands read back.

output_dir/
  recipe.yaml                  the resolved recipe (written first; later commands read the base from it)
  adapter_config.json          the PEFT adapter, as safetensors
  adapter_model.safetensors
  tokenizer files              with the Llama 2 chat template
  metrics.json                 written last: a run without it did not finish
  checkpoint-N/                Trainer checkpoints (for --resume)
  runs/                        TensorBoard logs

Every final file is written to a temporary name and renamed into place, so an interrupted job
never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from ft import recipe as recipe_mod
from ft.errors import UserError

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"


def prepare(recipe: recipe_mod.Recipe, *, resume: bool) -> tuple[Path, str | None]:
    """Create or check the run folder; returns it and the checkpoint to resume from (if --resume)."""
    out = Path(recipe.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out}: exists and is not a folder")
    existing = out / RECIPE_FILE
    if out.is_dir() and any(out.iterdir()):
        if not existing.is_file():
            raise UserError(f"output_dir {out}: not empty and not an llama-ft run; choose another output_dir")
        differences = diff(read_recipe(out), recipe)
        if differences:
            raise UserError(
                f"output_dir {out}: holds a run of a different recipe ({'; '.join(differences)}); "
                "choose another output_dir"
            )
        checkpoint = last_checkpoint(out)
        if resume:
            if checkpoint is None:
                raise UserError(f"output_dir {out}: --resume given but there is no checkpoint-N/ to resume from")
            return out, checkpoint
        if (out / METRICS_FILE).is_file():
            raise UserError(f"output_dir {out}: this run already finished; choose another output_dir")
        if checkpoint is not None:
            raise UserError(f"output_dir {out}: has {Path(checkpoint).name}/; pass --resume to continue from it")
    elif resume:
        raise UserError(f"output_dir {out}: --resume given but there is no earlier run there")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RECIPE_FILE, recipe_mod.dump(recipe))
    return out, None


def read_recipe(run_dir: str | Path) -> recipe_mod.Recipe:
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not an llama-ft run folder (no {RECIPE_FILE})")
    return recipe_mod.validate(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))


def diff(old: recipe_mod.Recipe, new: recipe_mod.Recipe) -> list[str]:
    """Human-readable differences between two recipes, ignoring output_dir."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    keys = sorted((set(a) | set(b)) - {"output_dir"})
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(beside: Path) -> Path:
    """A temporary folder next to `beside` (same file system, so a rename publishes it), with normal permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.partial-", dir=beside.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_final(out: Path, save) -> None:
    """Call save(tmp_dir) and move what it wrote into `out`, file by file with atomic renames."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        save(tmp)
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
