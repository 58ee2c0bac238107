"""The run folder: what a stage writes, and what later commands read back.

output_dir/
  recipe.yaml                  the resolved recipe (written first; later commands read the base from it)
  inputs.json                  hashes of the data files, the base model's config and the starting adapter,
                               so that --resume refuses inputs that changed under the checkpoints
  adapter_config.json          the PEFT adapter, as safetensors
  adapter_model.safetensors
  tokenizer files              with the Llama 2 chat template
  metrics.json                 written last: a run without it did not finish
  checkpoint-N/                Trainer checkpoints (for --resume)
  runs/                        TensorBoard logs

Every final file is written to a temporary name and renamed into place, so an interrupted job
never leaves a folder that looks finished. This module is also the one reader of run folders: whether a folder is
a run (`is_run`) and finished (`require_finished`), its recipe (`read_recipe`), its adapter's config and LoRA shape
(`adapter_config`, `lora_shape`), and the LoRA shape a recipe trains (`trained_lora`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from ft import distributed
from ft import recipe as recipe_mod
from ft.errors import UserError
from ft.stages.registry import STAGES

RECIPE_FILE = "recipe.yaml"
INPUTS_FILE = "inputs.json"
METRICS_FILE = "metrics.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------- reading a run folder


def is_run(folder: str | Path) -> bool:
    """A llama-ft run folder with its final adapter: recipe.yaml and adapter_config.json."""
    folder = Path(folder)
    return (folder / RECIPE_FILE).is_file() and (folder / ADAPTER_CONFIG).is_file()


def require_finished(folder: str | Path, what: str) -> Path:
    """The run folder, if it finished (its final adapter and metrics.json are there); else a UserError saying how
    `what` (the command or key that needs it) can get one."""
    folder = Path(folder).expanduser()
    if not (folder / RECIPE_FILE).is_file():
        raise UserError(f"{what}: {folder} is not an llama-ft run folder (no {RECIPE_FILE})")
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METRICS_FILE) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{what}: the run in {folder} did not finish (no {missing[0]}); finish it with --resume")
    return folder


def adapter_config(folder: str | Path, what: str = "adapter") -> dict:
    """A saved PEFT adapter's adapter_config.json (a run folder, a checkpoint-N/ or an adapter folder)."""
    path = Path(folder).expanduser() / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{what}: {str(folder)!r} has no {ADAPTER_CONFIG} (expected a finished llama-ft run folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def lora_shape(folder: str | Path, what: str = "adapter") -> recipe_mod.LoraSection:
    """The LoRA shape of a saved adapter (rank, alpha, dropout, target modules) as a recipe's lora section."""
    saved = adapter_config(folder, what)
    return recipe_mod.LoraSection(r=saved["r"], alpha=saved["lora_alpha"], dropout=saved.get("lora_dropout") or 0.0,
                                  target_modules=sorted(set(saved["target_modules"])))


def is_chat_model(recipe: recipe_mod.Recipe) -> bool:
    """Whether a run of this recipe trains a chat model (chat, merge, compare and eval take it), not a scorer."""
    return STAGES[recipe.stage].chat_model


def trained_lora(recipe: recipe_mod.Recipe, *, missing_ok: bool = False) -> recipe_mod.LoraSection:
    """The LoRA shape this run trains, the one meaning of `lora:` that every reader uses (the resume check, the model
    card, PPO's value adapter, the planner): the saved adapter's shape when the run continues one (model.adapter),
    else the recipe's lora: section.

    With model.adapter, a lora: key the user set (in the file or with --set; defaults do not count) that differs from
    the saved shape is a UserError naming both. `missing_ok`: an adapter that is not on disk yet (a pipeline's later
    stage, a plan made before the run) gives lora: instead of an error.
    """
    adapter = recipe.model.adapter
    if not adapter or (missing_ok and not (Path(adapter).expanduser() / ADAPTER_CONFIG).is_file()):
        return recipe.lora
    saved = lora_shape(adapter, "model.adapter")
    if "lora" in recipe.model_fields_set:
        given = {k: getattr(recipe.lora, k) for k in recipe.lora.model_fields_set}
        if "target_modules" in given:
            given["target_modules"] = sorted(set(given["target_modules"]))
        clash = [f"lora.{k}: {v!r} in the recipe, {getattr(saved, k)!r} in model.adapter {adapter}"
                 for k, v in given.items() if v != getattr(saved, k)]
        if clash:
            raise UserError(f"lora: contradicts the adapter this run continues ({'; '.join(clash)}): a continued "
                            "adapter keeps its saved shape; drop those lora: keys, or start a new adapter without "
                            "model.adapter")
    return saved


def with_trained_lora(recipe: recipe_mod.Recipe) -> recipe_mod.Recipe:
    """The recipe with lora: set to the shape it trains (what the run folder's recipe.yaml records). A model.adapter
    not on disk is left to the stage's loading to name."""
    lora = trained_lora(recipe, missing_ok=True)
    return recipe if lora is recipe.lora else recipe.model_copy(update={"lora": lora})


# ---------------------------------------------------------------- writing a run folder


def prepare(recipe: recipe_mod.Recipe, *, resume: bool) -> tuple[Path, str | None]:
    """Create or check the run folder; returns it and the checkpoint to resume from (if --resume). With several
    processes the main one does it and the others get its answer (or its error)."""
    return distributed.on_main(lambda: _prepare(recipe, resume=resume))


def _prepare(recipe: recipe_mod.Recipe, *, resume: bool) -> tuple[Path, str | None]:
    out = Path(recipe.output_dir).expanduser()
    recipe = with_trained_lora(recipe)  # a lora: that contradicts model.adapter's saved shape is refused here
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
            if (out / METRICS_FILE).is_file():
                raise UserError(f"output_dir {out}: this run already finished; there is nothing to resume")
            if checkpoint is None:
                raise UserError(f"output_dir {out}: --resume given but there is no checkpoint-N/ to resume from")
            changed = changed_inputs(out, recipe) + lora_mismatch(Path(checkpoint), recipe)
            if changed:
                raise UserError(
                    f"output_dir {out}: cannot resume, the inputs differ from the checkpoint's: {'; '.join(changed)}. "
                    "Restore them, or start a new run in another output_dir"
                )
            return out, checkpoint
        if (out / METRICS_FILE).is_file():
            raise UserError(f"output_dir {out}: this run already finished; choose another output_dir")
        if checkpoint is not None:
            raise UserError(f"output_dir {out}: has {Path(checkpoint).name}/; pass --resume to continue from it")
    elif resume:
        raise UserError(f"output_dir {out}: --resume given but there is no earlier run there")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / INPUTS_FILE, fingerprint(recipe))
        write_text(out / RECIPE_FILE, recipe_mod.dump(recipe))
    except OSError as e:
        raise UserError(f"output_dir {out}: cannot write there ({e.strerror or e}); choose another output_dir") from None
    return out, None


def fingerprint(recipe: recipe_mod.Recipe) -> dict:
    """What a checkpoint depends on beyond the recipe's text: the bytes of the local data files, the base
    model's config and weight files, and the adapter training starts from. Hub datasets are named, not hashed."""
    inputs = {}
    for source in recipe.data.train + (recipe.data.eval or []):
        path = Path(source.path).expanduser()
        if path.is_file():
            inputs[f"data file {source.path}"] = _sha256(path)
        else:  # a Hub dataset, or a missing file (reading the data says so, with the path)
            inputs[f"data file {source.path}"] = "missing" if Path(source.path).suffix else "hub dataset (not hashed)"
    model = Path(recipe.model.name).expanduser()
    if recipe.model.name.startswith("builtin:"):
        from ft import tiny

        model = tiny.path()
    if (model / "config.json").is_file():
        inputs["model config.json"] = _sha256(model / "config.json")
        weights = sorted(p for p in model.iterdir() if p.suffix in (".safetensors", ".bin"))
        inputs["model weight files"] = ", ".join(f"{p.name} ({p.stat().st_size} bytes)" for p in weights)
    if recipe.model.adapter:
        adapter = Path(recipe.model.adapter).expanduser() / "adapter_model.safetensors"
        inputs["starting adapter"] = _sha256(adapter) if adapter.is_file() else "missing"
    inputs["processes"] = str(distributed.world_size())  # the data order and the batch per step depend on it
    if recipe.ppo is not None:  # what the rewards come from
        for run in recipe.ppo.reward_models + ([recipe.ppo.safety_model] if recipe.ppo.safety_model else []):
            adapter = Path(run).expanduser() / "adapter_model.safetensors"
            inputs[f"reward model {run}"] = _sha256(adapter) if adapter.is_file() else "missing"
        if recipe.ppo.reward_function:
            source = Path(recipe.ppo.reward_function.rpartition(":")[0]).expanduser()
            inputs[f"reward function {source}"] = _sha256(source) if source.is_file() else "missing"
    return inputs


def changed_inputs(out: Path, recipe: recipe_mod.Recipe) -> list[str]:
    """The inputs whose fingerprint differs from the one recorded when the run started."""
    recorded = read_json(out / INPUTS_FILE)
    if not recorded:
        return []  # a run started before fingerprints were recorded
    recorded.setdefault("processes", "1")  # runs from before it was recorded ran in one process
    now = fingerprint(recipe)
    return [
        f"{key} changed since the run started ({_short(recorded.get(key))} then, {_short(now.get(key))} now)"
        + ("; resume with as many processes as the run started with" if key == "processes" else "")
        for key in sorted(set(recorded) | set(now))
        if recorded.get(key) != now.get(key)
    ]


def lora_mismatch(checkpoint: Path, recipe: recipe_mod.Recipe) -> list[str]:
    """Differences between the checkpoint's adapter shape and the shape the recipe trains (trained_lora)."""
    if not (checkpoint / ADAPTER_CONFIG).is_file():
        return []
    saved, now = lora_shape(checkpoint), trained_lora(recipe)
    pairs = [("lora.r", saved.r, now.r), ("lora.alpha", saved.alpha, now.alpha),
             ("lora.target_modules", saved.target_modules, sorted(now.target_modules))]
    return [f"{key}: {old!r} in {checkpoint.name}, {new!r} now" for key, old, new in pairs if old != new]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _short(value) -> str:
    if value is None:
        return "absent"
    return value[:19] + "…" if value.startswith("sha256:") else value


def read_recipe(run_dir: str | Path) -> recipe_mod.Recipe:
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not an llama-ft run folder (no {RECIPE_FILE})")
    return recipe_mod.validate(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))


def diff(old: recipe_mod.Recipe, new: recipe_mod.Recipe) -> list[str]:
    """Human-readable differences between two recipes, ignoring where the result goes (output_dir, output.*), and
    lora: when both continue model.adapter (its saved shape is trained, and lora_mismatch checks it)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    continued = old.model.adapter and new.model.adapter
    keys = sorted(k for k in set(a) | set(b) if k != "output_dir" and not k.startswith("output.")
                  and not (continued and k.startswith("lora.")))
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
    """The newest complete checkpoint-N/. The Trainer writes trainer_state.json last, so a checkpoint
    without a readable one was cut off mid-write (a crash, kill -9): it is removed, and the one before used."""
    found = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    for checkpoint in found:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            return str(checkpoint)
        except (OSError, ValueError):
            print(f"{checkpoint.name}/ is incomplete (written when the run was cut off): removing it", flush=True)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def read_json(path: Path) -> dict:
    """A JSON file the run folder may hold ({} when it is absent)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: a temporary file in the same folder, then rename. Only the main process writes."""
    if not distributed.is_main():
        return
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


def publish_dir(tmp: Path, target: Path) -> None:
    """Put the folder `tmp` (made by make_temp_dir beside `target`) in place of `target` by renames: an older
    `target` is moved aside first and removed after, so `target` is never a half-written folder."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, target)


def rotate_checkpoints(run_dir: Path, keep: int | None) -> None:
    """Remove all but the newest `keep` checkpoint-N/ folders (all are kept when `keep` is None or 0)."""
    found = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name[11:]) if p.name[11:].isdigit() else -1)
    for old in found[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_final(out: Path, save) -> None:
    """Call save(tmp_dir) and move what it wrote into `out`, file by file with atomic renames. With several processes
    every one calls save (gathering sharded weights is collective) into the main process's folder, which moves it."""
    tmp = Path(distributed.on_main(lambda: tempfile.mkdtemp(prefix=".final-", dir=out)))
    try:
        save(tmp)
        distributed.barrier()
        if distributed.is_main():
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
    finally:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
