"""`llama-ft pipeline RECIPE`: the Llama 2-Chat recipe as one resumable command (also `ft.run_pipeline`).

Round 0 is the SFT. Each RLHF round K then, in order (the steps of ft/pipeline_recipe.py's `stages`):
  prefs           two answers per drawn pool prompt, from the latest model (round K-1's) and the one before it
                  (round 1: the SFT model again), at two temperatures; labelled by a judge, by people on the annotate
                  page, or read from a file: round-K/prefs.jsonl, split into the reward models' train and held-out pairs;
  reward-helpful  (and reward-safety) trained on the pairs of rounds 1..K, accuracy measured on the held-out ones;
  rejection, ppo  as the round's method says, from the latest model, judged by the round's reward models;
  compare-sft, compare-prev  the round's model against the SFT model and round K-1's on the held-out prompts, by
                  the round's reward models and, when compare.judge names one, by that independent judge too.
Every stage is an ordinary run folder made by ft.runner.run_stage from an ordinary recipe file (written to
round-K/recipes/NAME.yaml first), so merge, chat, eval and push work on any round. The pipeline adds no stage logic.

pipeline.json (written atomically after every step) holds the steps done and every figure: its `rounds` has one
entry per finished round with `round`, `vs_sft` and `vs_previous` (judge name -> {win, tie, loss, n, ...}), the
reward models' held-out accuracy and the preference counts; report.md and progress.png are drawn from it
(ft/pipeline_report.py). `--resume` continues at the step that was interrupted, with that stage's own --resume when
it has a checkpoint; a recipe changed under a round that already started is refused, naming the key; raising
`rounds` adds rounds.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import yaml

from ft import pipeline_recipe as pr
from ft import runs
from ft.errors import UserError

STATE_FILE, RECIPE_FILE = "pipeline.json", "recipe.yaml"
HELD_OUT_FILE = "held-out-prompts.jsonl"


def run_pipeline(recipe: str | Path, *, overrides: Sequence[str] = (), rounds: int | None = None,
                 until: str | None = None, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or with `resume`, continue) a pipeline recipe; returns what pipeline.json holds.

    `overrides` are `--set` strings; `rounds` replaces the recipe's rounds; `until` ("ROUND/STAGE", e.g. "1/reward" or
    "2/rejection") stops after that step. Raises ft.errors.UserError for anything the user must fix, and
    ft.errors.Interrupted (from the stage) on Ctrl-C or SIGTERM."""
    overrides = list(overrides) + ([f"rounds={rounds}"] if rounds is not None else [])
    pipe = pr.load(recipe, overrides)
    out = Path(pipe.output_dir).expanduser()
    steps = [(k, name) for k in range(pipe.rounds + 1) for name in pr.stages(pipe, k)]
    last = _until(until, steps)
    state = _open(out, pipe, resume=resume)
    held_out = _held_out_prompts(pipe, out)
    from ft import pipeline_report

    for k, name in steps[:last + 1]:
        step = f"{k}/{name}"
        if step not in state["done"]:
            log(f"\n==== pipeline: round {k}, {name}")
            _run_step(pipe, k, name, held_out, log)
            state["done"].append(step)
            state["rounds"] = figures(pipe, state["done"])
            runs.write_json(out / STATE_FILE, state)
            if name.startswith("compare") and step == f"{k}/{pr.stages(pipe, k)[-1]}":
                pipeline_report.write(out, state, log=log)
    pipeline_report.write(out, state, log=log)
    where = "finished" if last == len(steps) - 1 else f"stopped after round {steps[last][0]} {steps[last][1]} (--until)"
    latest = state["rounds"][-1]["model"] if state["rounds"] else pr.policy(pipe, 0)
    log(f"\npipeline {where}: {out / STATE_FILE}, {out / 'report.md'}; the latest finished model: {latest}")
    return state


# ---------------------------------------------------------------- state and resume


def _open(out: Path, pipe: pr.PipelineRecipe, *, resume: bool) -> dict:
    """The state to continue from ({} steps done for a new pipeline); refuses a changed recipe on resume."""
    state_file = out / STATE_FILE
    if not resume:
        if state_file.is_file():
            raise UserError(f"output_dir {out}: holds a pipeline already; continue it with --resume, or choose "
                            "another output_dir")
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"output_dir {out}: not empty and not a pipeline; choose another output_dir")
        out.mkdir(parents=True, exist_ok=True)
        state = {"done": [], "rounds": [], "output_dir": str(out)}
    else:
        if not state_file.is_file():
            raise UserError(f"output_dir {out}: --resume given but there is no pipeline there ({STATE_FILE})")
        state = json.loads(state_file.read_text(encoding="utf-8"))
        old = pr.PipelineRecipe.model_validate(yaml.safe_load((out / RECIPE_FILE).read_text(encoding="utf-8")))
        changed = recipe_changes(old, pipe, started=max((int(s.split("/")[0]) for s in state["done"]), default=0))
        if changed:
            raise UserError(f"output_dir {out}: the recipe changed under rounds that already ran ({'; '.join(changed)}); "
                            "restore it (only rounds may be raised), or start a new pipeline in another output_dir")
    runs.write_text(out / RECIPE_FILE, pr.dump(pipe))
    runs.write_json(state_file, state)
    return state


def recipe_changes(old: pr.PipelineRecipe, new: pr.PipelineRecipe, *, started: int) -> list[str]:
    """The keys that differ, except `rounds` and the methods of rounds that have not started."""
    a, b = runs._flatten(old.model_dump(mode="json")), runs._flatten(new.model_dump(mode="json"))
    keys = sorted(k for k in set(a) | set(b) if k not in ("rounds", "methods", "output_dir"))
    changed = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k)]
    for k in range(1, min(started, old.rounds) + 1):
        if old.method(k) != new.method(k):
            changed.append(f"methods: round {k} ran as {old.method(k)!r}, {new.method(k)!r} now")
    return changed


def _until(until: str | None, steps: list[tuple[int, str]]) -> int:
    """The index of the last step to run: the last one `until` (ROUND/STAGE; reward = both reward models,
    compare = both comparisons) names."""
    if until is None:
        return len(steps) - 1
    k, _, name = until.partition("/")
    matches = [i for i, (r, n) in enumerate(steps) if str(r) == k.strip() and (n == name or n.startswith(f"{name}-"))]
    if not k.strip().isdigit() or not matches:
        names = sorted({n for _, n in steps} | {"reward", "compare"})
        raise UserError(f"--until {until}: expected ROUND/STAGE with a round 0..{steps[-1][0]} and a stage of it "
                        f"({', '.join(names)}), e.g. --until 1/reward")
    return matches[-1]


# ---------------------------------------------------------------- the steps


def _run_step(pipe: pr.PipelineRecipe, k: int, name: str, held_out: Path, log) -> None:
    if name == "prefs":
        collect_preferences(pipe, k, log)
    elif name.startswith("compare-"):
        _compare(pipe, k, name, held_out, log)
    else:
        _train(pipe, k, name, log)


def _train(pipe: pr.PipelineRecipe, k: int, name: str, log) -> None:
    """One training stage through run_stage, from its recipe file; its own --resume when it left a checkpoint."""
    from ft.runner import run_stage

    stage = name.split("-")[0]
    from ft import recipe as recipe_mod

    loaded = recipe_mod.validate(pr.stage_recipe(pipe, k, name), source=f"round {k} {name}")
    recipe_file = pr.stage_dir(pipe, k, "recipes") / f"{name}.yaml"
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    runs.write_text(recipe_file, f"# round {k} {name} of the pipeline {pipe.output_dir} (written by llama-ft pipeline)\n"
                    + recipe_mod.dump(loaded))
    folder = Path(loaded.output_dir)
    trained = folder / "sft" if stage == "rejection" else folder  # a rejection run's adapter is in its sft/
    if (trained / runs.METRICS_FILE).is_file():
        return  # finished before the state was saved
    if trained.is_dir() and runs.last_checkpoint(trained):
        if stage == "rejection":  # its fine-tuning part is an SFT run of its own, resumed as one
            log(f"resuming the rejection run's fine-tuning in {trained}")
            run_stage("sft", trained / runs.RECIPE_FILE, resume=True, say=log)
        else:
            log(f"resuming {folder} from its last checkpoint")
            run_stage(stage, recipe_file, resume=True, say=log)
        return
    if folder.exists():  # cut off before its first checkpoint: nothing to keep
        log(f"{folder} was cut off before its first checkpoint: starting it again")
        shutil.rmtree(folder)
    run_stage(stage, recipe_file, say=log)


def _held_out_prompts(pipe: pr.PipelineRecipe, out: Path) -> Path:
    """The held-out prompts as one JSONL file (compare reads a file), checked to share no prompt with the pool."""
    from ft import data

    held_out, report = data.load_prompts(pipe.prompts.held_out, skip_invalid=False)
    pool, _ = data.load_prompts(pipe.prompts.pool, skip_invalid=False)
    seen = {json.dumps(p["prompt"], sort_keys=True) for p in pool}
    shared = [p["origin"] for p in held_out if json.dumps(p["prompt"], sort_keys=True) in seen]
    if shared:
        raise UserError(f"prompts.held_out: {shared[0]} is also in prompts.pool ({len(shared)} shared); held-out "
                        "prompts must never be trained on")
    path = out / HELD_OUT_FILE  # each prompt compare.samples times: every row is answered (and judged) on its own
    runs.write_text(path, "".join(json.dumps({"prompt": p["prompt"], "safety": p["safety"]}, ensure_ascii=False) + "\n"
                                  for p in held_out for _ in range(pipe.compare.samples)))
    return path


# ---------------------------------------------------------------- preferences


def collect_preferences(pipe: pr.PipelineRecipe, k: int, log) -> dict:
    """Round K's preference rows in round-K/prefs.jsonl (by the judge, people or a file), then the reward models'
    train and held-out pairs; returns the counts (also in round-K/prefs.json)."""
    cfg = pipe.preferences
    prefs = pr.stage_dir(pipe, k, "prefs.jsonl")
    prefs.parent.mkdir(parents=True, exist_ok=True)
    summary_file = pr.stage_dir(pipe, k, "prefs.json")
    summary = runs.read_json(summary_file)
    if cfg.source == "judge" and not prefs.is_file():
        summary = _judged(pipe, k, prefs, log)
    elif cfg.source == "people":
        summary = _people(pipe, k, prefs, log)
    elif cfg.source == "file" and not prefs.is_file():
        summary = _from_file(pipe, k, prefs, log)
    summary.update(_split(pipe, k, prefs))
    runs.write_json(summary_file, summary)
    log(f"round {k} preferences: {summary['rows']} rows ({cfg.source}); reward pairs: "
        f"{summary['helpful_train']} train, {summary['helpful_eval']} held out")
    return summary


def variants(pipe: pr.PipelineRecipe, k: int) -> list[tuple[str, float]]:
    """(run folder, temperature) of the two variants answering round K's prompts: the latest model and the one
    before it (round 1: the SFT model at the other temperature)."""
    first, second = pipe.preferences.temperatures
    return [(str(pr.policy(pipe, k - 1)), first), (str(pr.policy(pipe, max(k - 2, 0))), second)]


def _round_prompts(pipe: pr.PipelineRecipe, k: int) -> list[dict]:
    from ft import data

    pool, _ = data.load_prompts(pipe.prompts.pool, skip_invalid=False)
    count, rng = pipe.prompts.per_round or len(pool), random.Random(pipe.preferences.seed * 1000 + k)
    drawn = []
    while len(drawn) < count:  # more than the pool: every prompt again (its answers are sampled anew)
        drawn += rng.sample(pool, len(pool))
    return drawn[:count]


def _judged(pipe: pr.PipelineRecipe, k: int, prefs: Path, log) -> dict:
    """Both variants answer the drawn prompts (one model loaded at a time); the judge labels each pair."""
    import torch

    from ft import chat, memory_use
    from ft.reward_model import load_judge
    from ft.sampling import generate

    cfg = pipe.preferences
    prompts = _round_prompts(pipe, k)
    messages, flags = [p["prompt"] for p in prompts], [p["safety"] for p in prompts]
    answers = []
    for i, (run, temperature) in enumerate(variants(pipe, k)):
        model, tokenizer = chat.load(run)
        torch.manual_seed(cfg.seed * 1000 + k * 10 + i)
        answers.append([c[0].text for c in generate(model, tokenizer, messages, temperature=temperature, top_p=cfg.top_p,
                                                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                                    greedy=temperature == 0)])
        log(f"round {k} preferences: {run} answered {len(messages)} prompts at temperature {temperature}")
        del model
        memory_use.free_models()
    judge = load_judge(cfg.judge)
    scores, _ = judge(messages + messages, answers[0] + answers[1], flags + flags)
    n, rows, ties = len(messages), [], 0
    (run_a, t_a), (run_b, t_b) = variants(pipe, k)
    for i in range(n):
        a, b, score_a, score_b = answers[0][i], answers[1][i], scores[i], scores[n + i]
        if a == b or score_a == score_b or not a.strip() or not b.strip():
            ties += 1
            continue
        first = score_a > score_b
        margin = abs(score_a - score_b)
        strength = next((s for s, t in zip(pr.STRENGTH_ORDER, cfg.strengths) if margin >= t), "negligibly_better")
        rows.append({"prompt": messages[i], "chosen": a if first else b, "rejected": b if first else a,
                     "strength": strength, "safety": flags[i],
                     "chosen_model": run_a if first else run_b, "chosen_temperature": t_a if first else t_b,
                     "rejected_model": run_b if first else run_a, "rejected_temperature": t_b if first else t_a,
                     "judge": cfg.judge, "chosen_score": max(score_a, score_b), "rejected_score": min(score_a, score_b)})
    runs.write_text(prefs, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    log(f"round {k} preferences: the judge labelled {len(rows)} pairs; {ties} ties (identical answers or equal "
        "scores) left out")
    return {"source": "judge", "prompts": n, "ties_left_out": ties}


def _from_file(pipe: pr.PipelineRecipe, k: int, prefs: Path, log) -> dict:
    from ft import data
    from ft.recipe import DataSource

    source = Path(pipe.preferences.file.replace("{round}", str(k))).expanduser()
    if not source.is_file():
        raise UserError(f"preferences.file: {source} (round {k}) not found")
    data.load_pairs([DataSource(path=str(source))], skip_invalid=False)  # every row checked, naming file and line
    runs.write_text(prefs, source.read_text(encoding="utf-8"))
    return {"source": "file", "file": str(source)}


def _people(pipe: pr.PipelineRecipe, k: int, prefs: Path, log) -> dict:
    """The annotate page on the round's two variants, until preferences.rows rows are on disk or the page is closed.
    Rows are appended (flush + fsync) as they are chosen: a pipeline killed here keeps every saved row."""
    cfg = pipe.preferences
    have = _count(prefs)
    if have < cfg.rows:
        from ft import annotate, chat, web
        from ft.chat import Session

        web.check_exposure(cfg.host, False, None, False)
        annotate.check_output(prefs)
        engine = dict(system=cfg.system, max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p)
        loaded = {}
        sides = []
        for run, temperature in variants(pipe, k):
            if run not in loaded:
                loaded[run] = chat.load(run)
            sides.append(annotate.Variant(run, Session(*loaded[run], temperature=temperature, **engine)))
        annotator = annotate.Annotator(tuple(sides), annotate.RowWriter(prefs), system=cfg.system)
        closed = threading.Event()  # set when the annotator closes the page
        page = web.annotate_page(annotator, title=f"llama-ft pipeline, round {k}: {cfg.rows} rows wanted, "
                                                  f"{have} on disk ({prefs})", on_close=closed.set)
        log(f"round {k} preferences: {cfg.rows - have} more rows wanted from people; serving the annotate page")
        web.launch(page, host=cfg.host, port=cfg.port, share=False, auth=None, block=False, out=log)
        try:
            while _count(prefs) < cfg.rows and not (closed.is_set() and _count(prefs) >= 2):
                time.sleep(0.5)
        finally:
            page.close()
        del loaded
    rows = _count(prefs)
    log(f"round {k} preferences: {rows} rows on disk" + (" (the page was closed)" if rows < cfg.rows else ""))
    return {"source": "people", "wanted": cfg.rows}


def _count(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _split(pipe: pr.PipelineRecipe, k: int, prefs: Path) -> dict:
    """Round K's rows into the reward models' train and held-out pairs (a seeded draw; a row keeps its side for both
    models). The safety model's pairs: adversarial prompts and people's `chosen_safe` rows (all rows when the round
    has none, and the counts say so)."""
    from ft import data
    from ft.recipe import DataSource

    rows = [json.loads(line) for line in prefs.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) < 2:
        raise UserError(f"{prefs}: round {k} has {len(rows)} preference rows; reward training and its held-out "
                        "accuracy need at least 2 (more prompts, prompts.per_round, or preferences.rows)")
    data.load_pairs([DataSource(path=str(prefs))], skip_invalid=False)  # every row as reward training reads it
    order = list(range(len(rows)))
    random.Random(pipe.preferences.seed * 1000 + k).shuffle(order)
    held = set(order[:max(1, round(pipe.preferences.held_out_fraction * len(rows)))])
    counts = {"rows": len(rows)}
    safety = [i for i, r in enumerate(rows) if r.get("safety") is True or r.get("safety_label") == "chosen_safe"]
    kinds = {"helpful": list(range(len(rows)))}
    if pipe.reward.safety:
        kinds["safety"] = safety or list(range(len(rows)))
        counts["safety_rows"] = len(safety)
        if not safety:
            counts["safety_note"] = "no adversarial or chosen_safe row this round: the safety model trains on all rows"
    for kind, picked in kinds.items():
        splits = {"train": [rows[i] for i in picked if i not in held], "eval": [rows[i] for i in picked if i in held]}
        for split, other in (("train", "eval"), ("eval", "train")):
            if not splits[split]:  # too few rows of this kind to keep one out: a file is never empty, and it is said
                splits[split] = splits[other][:1]
                counts[f"{kind}_note"] = f"one {kind} pair is both trained on and held out (too few this round)"
        for split, chosen in splits.items():
            runs.write_text(pr.pair_file(pipe, k, kind, split),
                            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))
            counts[f"{kind}_{split}"] = len(chosen)
    return counts


# ---------------------------------------------------------------- measuring


def _compare(pipe: pr.PipelineRecipe, k: int, name: str, held_out: Path, log) -> None:
    """Round K's model against the SFT model (compare-sft) or round K-1's (compare-prev): answers to the held-out
    prompts (greedy, or compare.samples sampled ones each) judged by the round's reward models; then the independent
    judge re-scores the same answers."""
    from ft import compare
    from ft.reward_model import load_judge

    folder = pr.stage_dir(pipe, k, name)
    reference = pr.policy(pipe, 0 if name == "compare-sft" else k - 1)
    rms = [str(pr.stage_dir(pipe, k, n)) for n in pr.reward_models(pipe, k)]
    cfg = pipe.compare
    if not (folder / compare.RESULT_FILE).is_file():
        (folder / compare.ROWS_FILE).unlink(missing_ok=True)  # a comparison cut off after its rows: again
        compare.run(str(pr.policy(pipe, k)), str(reference), held_out, reward_models=rms[:1],
                    safety_model=rms[1] if len(rms) > 1 else None, tie_margin=cfg.tie_margin,
                    safety_threshold=cfg.safety_threshold, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.batch_size, output=folder, log=log)
    if cfg.judge:
        rows = [json.loads(line) for line in (folder / compare.ROWS_FILE).read_text(encoding="utf-8").splitlines()]
        result = compare.rejudge(rows, load_judge(cfg.judge), tie_margin=cfg.tie_margin)
        runs.write_json(folder / "judge.json", {**result, "judge": cfg.judge})
    log(f"round {k} {name}: done, in {folder}")


def _verdicts(folder: Path) -> dict:
    """judge name -> {win, tie, loss, n, win_rate, intervals, mean_reward} of one comparison folder."""
    from ft import compare

    result = json.loads((folder / compare.RESULT_FILE).read_text(encoding="utf-8"))
    parts = dict(result["judges"])
    if len(parts) > 1:
        parts = {"reward models (Rc)": result, **parts}  # helpfulness gated by safety, as PPO's reward
    if (folder / "judge.json").is_file():
        parts["judge"] = json.loads((folder / "judge.json").read_text(encoding="utf-8"))
    return {name: {"win": p["win"], "tie": p["tie"], "loss": p["loss"], "n": result["n"],
                   "win_rate": p["win"] + p["tie"] / 2, "intervals": p["intervals"],
                   "mean_reward": {"model": p["mean_score"]["A"], "reference": p["mean_score"]["B"]}}
            for name, p in parts.items()}


def figures(pipe: pr.PipelineRecipe, done: list[str]) -> list[dict]:
    """One entry per finished round (every step of it done), from the run folders."""
    finished = []
    for k in range(1, pipe.rounds + 1):
        if not all(f"{k}/{name}" in done for name in pr.stages(pipe, k)):
            continue
        vs_sft = _verdicts(pr.stage_dir(pipe, k, "compare-sft"))
        accuracy = {}
        for name in pr.reward_models(pipe, k):
            metrics = runs.read_json(pr.stage_dir(pipe, k, name) / runs.METRICS_FILE)
            acc = metrics.get("accuracy") or {}
            accuracy[name.removeprefix("reward-")] = {"accuracy": acc.get("overall"), "pairs": acc.get("pairs"),
                                                      "by_strength": acc.get("by_strength")}
        finished.append({
            "round": k, "method": pipe.method(k), "model": str(pr.policy(pipe, k)),
            "vs_sft": vs_sft,
            "vs_previous": vs_sft if k == 1 else _verdicts(pr.stage_dir(pipe, k, "compare-prev")),
            "previous": str(pr.policy(pipe, k - 1)),
            "reward_accuracy": accuracy,
            "preferences": runs.read_json(pr.stage_dir(pipe, k, "prefs.json")),
        })
    return finished


# ---------------------------------------------------------------- validate and plan


def plan(pipe: pr.PipelineRecipe, gpu, *, session_hours: float = 12.0) -> dict:
    """Every stage's plan (ft.plan.make: memory peak, hours) and the hours of each round; `largest` is the stage with
    the highest peak. The preference pairs do not exist yet: each reward stage is sized as the pairs its round will
    have (prompts drawn or rows wanted, less the held-out share, times the rounds so far), each a pool prompt and an
    answer of preferences.max_new_tokens tokens."""
    from ft import plan as plan_mod

    cfg = pipe.preferences
    stages = []
    for (k, name), loaded in pr.stage_recipes(pipe, "recipe").items():
        size = None
        if loaded.stage == "reward":
            pool = plan_mod.data_size(pipe.prompts.pool, kind="prompts", tokenizer_file=plan_mod.tokenizer_file(loaded))
            per_round = cfg.rows if cfg.source == "people" else (pipe.prompts.per_round or pool.rows)
            prompt = pool.prompt_tokens or pool.tokens
            if per_round is not None and prompt is not None:
                size = plan_mod.DataSize(int(per_round * k * (1 - cfg.held_out_fraction)), prompt + cfg.max_new_tokens,
                                         prompt, "estimate", f"round {k}'s preference pairs (estimated)")
        stages.append({"round": k, "stage": name, "recipe": loaded,
                       "plan": plan_mod.make(loaded, gpu, session_hours=session_hours, data=size)})
    largest = max(stages, key=lambda s: s["plan"].peak_bytes)
    hours: dict[int, float | None] = {}
    for s in stages:
        before, h = hours.get(s["round"], 0.0), s["plan"].hours
        hours[s["round"]] = None if before is None or h is None else before + h
    return {"stages": stages, "largest": largest, "round_hours": hours}
