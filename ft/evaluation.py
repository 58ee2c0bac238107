"""`llama-ft eval`: benchmarks through lm-evaluation-harness on the model as it was trained.

The only module that uses lm-eval. The model is the object llama-ft loads itself (`chat.load`: a run's base,
quantised as trained, plus its adapter; a merged folder; a checkpoint), wrapped in lm-eval's HFLM with the run's
tokenizer. lm-eval's `simple_evaluate` ignores its batch_size for a prebuilt HFLM, so the batch size is given
to HFLM itself. `--base` runs the same evaluation again inside peft's `disable_adapter()`: the base as it was
before training, from the same weights in memory.

In the Llama 2 chat format (see ft/chat_format.py) each request's context is the dialog rendered by the run's
template (system message, few-shot examples as earlier turns, the question as the last user turn), and the
answer is scored after exactly one space, as `[/INST] answer` is encoded in training: the scored ids are the
dialog's training ids up to the end of the answer. (lm-eval's own chat path joins context and answer with no
delimiter, which gives other ids unless every answer starts with a space.)

Results keep lm-eval's layout (`results[task]["acc,none"]`, `["acc_stderr,none"]`); the JSON adds what reproduces
them. Beside a Llama 2 base, the paper's figure for a comparable task is printed (ft/llama2_paper.py).
"""

from __future__ import annotations

import difflib
import logging
import re
import time
from pathlib import Path

from ft import llama2_paper, runs, shipped
from ft.errors import UserError, first_line
from ft.stages.registry import STAGES

INSTALL = "pip install 'llama-ft[eval]'"
CHAT_MODES = ("auto", "on", "off")
EVAL_FOLDER = "eval"
CPU_BATCH = 8  # --batch-size auto on a CPU


def evaluate(model: str, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: str | int = "auto", system: str | None = None,
             chat_template: str = "auto", base: bool = False, output: str | None = None,
             quantization: str | None = None, adapter: str | None = None, log=print) -> dict:
    """Evaluate MODEL (anything `llama-ft chat` takes) on lm-eval `tasks`; print the table, write the JSON.

    Returns the report (what the JSON holds). The JSON goes to `output`, or for a run folder to a new file in
    RUN/eval/ (never overwriting); for other models only with `output`.
    """
    from ft import chat as chat_mod

    lm_eval = _lm_eval()
    if chat_template not in CHAT_MODES:
        raise UserError(f"--chat-template {chat_template}: expected auto, on or off")
    lineage = describe(model, adapter=adapter, quantization=quantization)
    if base and lineage["adapter"] is None:
        raise UserError(f"--base compares the adapter with the base it was trained on; {model} has no adapter "
                        "(give a run folder, or --adapter DIR)")
    task_manager, top = load_tasks(tasks, include_path=include_path)
    chat = chat_template == "on" or (chat_template == "auto" and lineage["chat_tuned"])
    net, tokenizer = chat_mod.load(model, adapter=adapter, quantization=quantization)
    lm = harness_model(net, tokenizer, chat=chat, batch_size=batch_size)
    settings = {"tasks": tasks, "include_path": include_path, "num_fewshot": num_fewshot, "limit": limit,
                "batch_size": lm.batch_size, "chat_template": chat, "system": system}
    started = time.perf_counter()
    results = run(lm_eval, lm, task_manager, top, num_fewshot=num_fewshot, limit=limit, system=system, chat=chat)
    base_results = None
    if base:
        with net.disable_adapter():
            base_results = run(lm_eval, lm, task_manager, top, num_fewshot=num_fewshot, limit=limit,
                               system=system, chat=chat)
    report = make_report(results, base_results, settings=settings, lineage=lineage,
                         lm_eval_version=lm_eval.__version__, seconds=time.perf_counter() - started)
    log(render(report))
    target = Path(output).expanduser() if output else (_new_file(Path(model) / EVAL_FOLDER)
                                                        if lineage["kind"] == "run" else None)
    if target is not None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            runs.write_json(target, report)
        except OSError as e:
            raise UserError(f"--output {target}: cannot write it ({e.strerror or e})") from None
        log(f"\nwrote {target}")
    return report


# ---------------------------------------------------------------- what is evaluated


def describe(model: str, *, adapter: str | None = None, quantization: str | None = None) -> dict:
    """The model's lineage: what it is (run, merged, checkpoint), its base, adapter and quantisation, and whether
    it was tuned on dialogs (which `--chat-template auto` follows)."""
    folder = Path(model).expanduser()
    is_run = runs.is_run(folder)
    if is_run:
        recipe = runs.read_recipe(folder)
        return {"model": str(model), "kind": "run", "stage": recipe.stage, "base": recipe.model.name,
                "adapter": str(folder), "quantization": quantization or recipe.model.quantization,
                "chat_tuned": runs.is_chat_model(recipe)}
    merge_report = runs.read_json(folder / "merge_report.json") if folder.is_dir() else {}
    if merge_report:
        return {"model": str(model), "kind": "merged", "stage": runs.read_recipe(folder).stage
                if (folder / runs.RECIPE_FILE).is_file() else None, "base": merge_report.get("base"),
                "merged_from": merge_report.get("run_dir"), "adapter": str(adapter) if adapter else None,
                "quantization": quantization or "none", "chat_tuned": True}
    adapter_run = Path(adapter).expanduser() if adapter else None
    return {"model": str(model), "kind": "checkpoint", "stage": None, "base": str(model),
            "adapter": str(adapter) if adapter else None, "quantization": quantization or "none",
            # Meta's -chat checkpoints were tuned on dialogs; an llama-ft run used as --adapter was too
            "chat_tuned": "chat" in str(model).lower()
            or bool(adapter_run and (adapter_run / runs.RECIPE_FILE).is_file())}


def harness_model(net, tokenizer, *, chat: bool, batch_size: str | int = "auto"):
    """lm-eval's HFLM around the loaded model and its tokenizer; in chat mode (see the module docstring) each
    answer is scored after one space following `[/INST]`, as in training."""
    from lm_eval.models.huggingface import HFLM

    class Llama2LM(HFLM):
        def _encode_pair(self, context: str, continuation: str):
            if chat:  # Meta's format: "[/INST] answer" (one space, the answer stripped), whatever the task's delimiter
                continuation = " " + continuation.strip()
            return super()._encode_pair(context, continuation)

    import torch

    if batch_size == "auto" and not torch.cuda.is_available():
        batch_size = CPU_BATCH  # lm-eval's probe looks for the largest batch without a CUDA out-of-memory error
    quiet = logging.getLogger("lm_eval.models.huggingface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warnings about a prebuilt model are about options llama-ft does not use
    try:
        lm = Llama2LM(pretrained=net, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_batch_size=64)
    finally:
        quiet.setLevel(level)
    return lm


# ---------------------------------------------------------------- tasks


def load_tasks(tasks: list[str], *, include_path: str | None = None):
    """lm-eval's TaskManager and the top-level tasks and groups `tasks` name (built, with their data loaded).

    A name is an lm-eval task, group or tag, a task in --include-path, or a task YAML file (a shipped one, such
    as datasets/tiny_facts_mc.yaml, is found outside a clone too). A YAML's relative data_files are resolved
    against the YAML's folder. Errors name the task: unknown (with the closest names), data not cached while
    offline (with the dataset it needs), a broken YAML.
    """
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UserError("--tasks: give at least one task (e.g. --tasks mmlu,arc_easy)")
    if include_path and not Path(include_path).expanduser().is_dir():
        raise UserError(f"--include-path {include_path}: no such folder")
    include = [str(Path(include_path).expanduser())] if include_path else []
    files = {name: _task_file(name) for name in tasks}
    # lm-eval indexes its ~15,000 built-in YAMLs in ~10-20 s: skipped when every task is local
    manager = TaskManager(include_path=include, include_defaults=False)
    if not all(files[n] is not None or n in manager.all_tasks for n in tasks):
        manager = TaskManager(include_path=include or None)
    specs = []
    for name in tasks:
        if files[name] is not None:
            specs.append(_local_config(files[name]))
        elif name in manager.all_tasks:
            entry = manager.task_index[name]
            in_lm_eval = entry.yaml_path is None or Path(_package_dir()) in Path(entry.yaml_path).resolve().parents
            specs.append(name if in_lm_eval else _local_config(Path(entry.yaml_path)))
        else:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UserError(f"--tasks: unknown task {name!r}{hint} (an lm-eval task, group or tag, a task YAML "
                            "file, or a task in --include-path; list them with `lm_eval ls tasks`)")
    loaded = {"tasks": {}, "groups": {}}
    for name, spec in zip(tasks, specs):
        try:
            one = manager.load([spec])
        except ConnectionError as e:  # datasets: "Couldn't reach 'owner/name' on the Hub (OfflineModeIsEnabled)"
            found = re.search(r"reach '([^']+)'", str(e))
            entry = manager.task_index.get(name)
            dataset = found.group(1) if found else (entry.cfg or {}).get("dataset_path", "?") if entry else "?"
            raise UserError(f"task {name}: its dataset {dataset} is not in the Hugging "
                            "Face cache and the Hub cannot be reached (offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). "
                            "Run it once online to cache the data, or use a task YAML with local data files") from None
        except FileNotFoundError as e:
            raise UserError(f"task {name}: a data file is missing ({e})") from None
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"task {name}: lm-eval cannot build it ({type(e).__name__}: {first_line(e)})") from None
        loaded["tasks"].update(one["tasks"])
        loaded["groups"].update(one["groups"])
    children = {c for group in loaded["groups"].values() for c in group.child_names}
    top = ([g for n, g in loaded["groups"].items() if n not in children]
           + [t for n, t in loaded["tasks"].items() if n not in children])
    return manager, top


def _task_file(name: str) -> Path | None:
    if not name.endswith((".yaml", ".yml")):
        return None
    path = Path(name).expanduser()
    found = path if path.is_file() else shipped.sample_file(name)
    if found is None:
        raise UserError(f"--tasks: task file {name} not found")
    return found


def _package_dir() -> str:
    import lm_eval

    return str(Path(lm_eval.__file__).resolve().parent)


def _local_config(path: Path) -> dict:
    """A task YAML's config, with relative data_files that exist next to it made absolute (lm-eval would look
    for them in the current directory)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader: includes, !function tags

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as e:  # yaml errors, bad includes, a !function that does not import
        raise UserError(f"task file {path}: lm-eval cannot read it ({type(e).__name__}: {first_line(e)})") from None
    files = (config.get("dataset_kwargs") or {}).get("data_files")

    def resolved(value):
        if isinstance(value, str):
            candidate = path.parent / value
            return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.exists() else value
        if isinstance(value, list):
            return [resolved(v) for v in value]
        if isinstance(value, dict):
            return {k: resolved(v) for k, v in value.items()}
        return value

    if files is not None:
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved(files)}
    return config


# ---------------------------------------------------------------- running


def run(lm_eval, lm, task_manager, top, *, num_fewshot, limit, system, chat) -> dict:
    """lm-eval's results for the tasks (its own dict: results, groups, versions, n-shot, n-samples, ...)."""
    results = lm_eval.simple_evaluate(
        model=lm, tasks=top, task_manager=task_manager, num_fewshot=num_fewshot, limit=limit,
        system_instruction=system, apply_chat_template=chat, fewshot_as_multiturn=chat,
        log_samples=False, bootstrap_iters=1000,
    )
    return results


def make_report(results: dict, base_results: dict | None, *, settings: dict, lineage: dict,
                lm_eval_version: str, seconds: float) -> dict:
    """The JSON: lm-eval's per-task results (and the base's), and what reproduces them."""
    from ft import __version__

    size = llama2_paper.size_of(lineage.get("base"))
    report = {
        "results": results["results"],
        "groups": results.get("groups", {}),
        "group_subtasks": results.get("group_subtasks", {}),
        "versions": results.get("versions", {}),
        "n-shot": results.get("n-shot", {}),
        "n-samples": results.get("n-samples", {}),
        "higher_is_better": results.get("higher_is_better", {}),
        "settings": settings,
        "model": lineage,
        "lm_eval_version": lm_eval_version,
        "llama_ft_version": __version__,
        "seconds": round(seconds, 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if base_results is not None:
        report["base_results"] = base_results["results"]
    paper = {task: {metric: found for metric in values if (found := llama2_paper.figure(task, metric, size))}
             for task, values in results["results"].items()}
    paper = {task: metrics for task, metrics in paper.items() if metrics}
    if paper:
        report["paper"] = {"citation": llama2_paper.CITATION, "caveat": llama2_paper.CAVEAT, "figures": paper}
    return report


# ---------------------------------------------------------------- showing


def render(report: dict) -> str:
    """The table: one line per top-level task or group and metric: value ± stderr, n, shots; with --base the
    base's value and the difference; beside a Llama 2 base, the paper's figure."""
    results, base = report["results"], report.get("base_results")
    subtasks = {t for g in report.get("group_subtasks", {}).values() for t in g}
    paper = (report.get("paper") or {}).get("figures", {})
    head = f"{'task':<28} {'metric':<24} {'value':>8} {'± stderr':>9} {'n':>6} {'shots':>5}"
    if base is not None:
        head += f" {'base':>8} {'Δ':>8}"
    lines = [head]
    for task, values in results.items():
        if task in subtasks:
            continue
        n = (report["n-samples"].get(task) or {}).get("effective", "")
        shots = report["n-shot"].get(task, "")
        for metric, value in values.items():
            if "," not in metric or "_stderr" in metric or not isinstance(value, (int, float)):  # metric,filter
                continue
            stderr = values.get(metric.replace(",", "_stderr,", 1))
            line = (f"{task:<28} {metric:<24} {value:>8.4f} "
                    f"{('± ' + format(stderr, '.4f')) if isinstance(stderr, (int, float)) else '':>9} {n:>6} {shots:>5}")
            if base is not None:
                before = (base.get(task) or {}).get(metric)
                line += (f" {before:>8.4f} {value - before:>+8.4f}" if isinstance(before, (int, float)) else "")
            if metric in paper.get(task, {}):
                f = paper[task][metric]
                line += f"   paper {f['value']:.3f} (Llama 2 {f['size']}, {f['shots']}-shot, {f['source']})"
            lines.append(line)
    model = report["model"]
    lines.append(f"\nmodel: {model['model']} ({model['kind']}; base {model['base']}, adapter {model['adapter']}, "
                 f"{model['quantization']}); chat template {'on' if report['settings']['chat_template'] else 'off'}"
                 f"; lm-eval {report['lm_eval_version']}")
    if paper:
        lines.append(f"{report['paper']['caveat']} ({report['paper']['citation']})")
    return "\n".join(lines)


def _new_file(folder: Path) -> Path:
    """A file name in `folder` that does not exist yet: eval-YYYYmmdd-HHMMSS[-N].json."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate, n = folder / f"eval-{stamp}.json", 2
    while candidate.exists():
        candidate, n = folder / f"eval-{stamp}-{n}.json", n + 1
    return candidate


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (its extra dependencies)
    except ImportError as e:
        raise UserError(f"llama-ft eval needs lm-evaluation-harness, which is not installed ({e}): {INSTALL}") from None
    return lm_eval


# ---------------------------------------------------------------- after training (the recipe's eval: section)


def after_training(recipe, output_dir, log=print) -> dict | None:
    """Run the recipe's `eval:` section on the finished run, with and without its adapter, and add the results
    to the run's metrics.json under "eval". Nothing when the recipe has no eval: section."""
    section = recipe.eval
    if section is None:
        return None
    out = Path(output_dir)
    folder = out / STAGES[recipe.stage].pushed_folder  # rejection / gatt train into sft/
    if not runs.is_run(folder):
        log(f"eval: no trained adapter in {out}; nothing to evaluate")
        return None
    import gc

    import torch

    gc.collect()  # the stage's model and trainer are gone: free their memory before loading the run again
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"\neval: {', '.join(section.tasks)} on {folder}, with and without the adapter")
    try:
        report = evaluate(str(folder), section.tasks, num_fewshot=section.num_fewshot, limit=section.limit,
                          system=section.system, base=True, output=None, log=log)
    except UserError as e:
        raise UserError(f"the run finished (the adapter is in {folder}), but its evaluation failed: {e}\n"
                        f"evaluate it later with: llama-ft eval {folder} --tasks {','.join(section.tasks)} --base") from None
    metrics = runs.read_json(folder / runs.METRICS_FILE)
    metrics["eval"] = report
    runs.write_json(folder / runs.METRICS_FILE, metrics)
    return report

