"""`llama-ft recipes --copy NAME [DEST]`: a shipped recipe (and the sample data files it names) copied to edit."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ft import pipeline_recipe, shipped
from ft.errors import UserError
from ft.recipe import validate


def copy_recipe(name: str, dest: Path | None) -> list[tuple[Path, Path]]:
    """Write the shipped recipe `name` to `dest` (a file, or an existing folder; default ./NAME.yaml), plus the
    sample data files it names that the current directory lacks. Returns [(source, written)]. Nothing is
    overwritten."""
    source = shipped.find_recipe(name)
    if source is None:
        raise UserError(f"--copy {name}: no shipped recipe of that name (shipped: {shipped.names()})")
    target = Path(dest).expanduser() if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise UserError(f"{target}: already exists; choose another destination (nothing was written)")
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    if pipeline_recipe.is_pipeline(raw):  # its prompts, its SFT data and the judge files shipped beside it
        pipe = pipeline_recipe.PipelineRecipe.model_validate(raw)
        sft = [] if pipe.sft.data is None else pipe.sft.data.train + (pipe.sft.data.eval or [])
        data = [s.path for s in pipe.prompts.pool + pipe.prompts.held_out + sft]
        data += [j.rpartition(":")[0] for j in (pipe.preferences.judge, pipe.compare.judge) if j and ".py:" in j]
        data = list(dict.fromkeys(data))
    else:
        loaded = validate(raw, source=str(source))
        data = [s.path for s in loaded.data.train + (loaded.data.eval or [])]
    samples = [(shipped.sample_file(p), Path(p)) for p in data if shipped.sample_file(p) is not None]
    for _, written in samples:
        if written.exists():
            raise UserError(f"{written}: already exists (nothing was written)")
    pairs = [(source, target)] + samples
    try:
        for src, written in pairs:
            written.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, written)
    except OSError as e:
        raise UserError(f"cannot write {e.filename or target}: {e.strerror or e}") from None
    return pairs
