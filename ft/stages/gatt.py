"""Ghost Attention (Llama 2-Chat): a system instruction that still holds many turns later.

1. instructions (gatt.instructions, or the built-in set; ft/instructions.py) and dialogs (data.train: only their
   user turns are used), checked first. The last gatt.eval_dialogs dialogs are held out for the evaluation
   (or data.eval's dialogs are used), never trained on;
2. each training dialog is cut to 1..gatt.max_turns user turns at random and gets 1..gatt.combine instructions
   (never two that conflict), joined into one;
3. the current model (model.name + model.adapter) answers turn after turn, its own answers as history, with the
   instruction appended to every user message ("{message}\\n\\n{instruction}"); a final answer that fails the
   instruction's checks is re-sampled up to gatt.retries times, then the dialog is dropped and counted;
4. output_dir/gatt.jsonl: one prompt/completion row per dialog: the instruction only as the system message (its
   short form with probability gatt.short_probability), the user messages without it, the sampled answers; the
   SFT data path trains the completion (the last answer) only, so every earlier turn, assistant ones included,
   gets label -100, as the paper says. Each row records its instructions, checks and whether the answer passed;
5. unless --no-train, the SFT stage continues the adapter on gatt.jsonl into output_dir/sft;
6. evaluation, before and after: adherence by turn 1..gatt.eval_turns on the held-out dialogs, the model answering
   its own history greedily, with the instruction only in the system message; and two reference curves, the
   instruction repeated in every user message (upper bound) and no instruction at all (floor). Only instructions
   with checks are drawn for it.
"""

from __future__ import annotations

import json
import random

import torch

from ft import data, instructions as instructions_mod, memory_use, models, runs, sampling
from ft.errors import UserError
from ft.recipe import Recipe
from ft.stages import common, sft as sft_stage

MODES = ("system", "every", "none")  # where the instruction is during the evaluation


def run(recipe: Recipe, *, resume: bool = False, train: bool = True, log=print) -> dict:
    if resume:
        raise UserError("gatt has no checkpoints of its own to resume; its fine-tuning part is an SFT run "
                        "(llama-ft sft OUTPUT_DIR/sft/recipe.yaml --resume)")
    cfg = recipe.gatt
    instructions = instructions_mod.load(cfg.instructions)
    out, _ = common.start(recipe, resume=False, log=log)

    # 1-2. dialogs, held-out dialogs, and what each one gets
    dialogs, report = data.load_dialogs(recipe.data.train, skip_invalid=recipe.data.skip_invalid)
    users = [[m["content"] for m in d["messages"] if m["role"] == "user"] for d in dialogs]
    if recipe.data.eval:
        held_out = [[m["content"] for m in d["messages"] if m["role"] == "user"]
                    for d in data.load_dialogs(recipe.data.eval, skip_invalid=recipe.data.skip_invalid)[0]]
    else:
        if cfg.eval_dialogs >= len(users):
            raise UserError(f"gatt.eval_dialogs {cfg.eval_dialogs}: data.train has only {len(users)} dialogs; "
                            "lower it, or give data.eval")
        users, held_out = users[:len(users) - cfg.eval_dialogs], users[len(users) - cfg.eval_dialogs:]
    rng = random.Random(recipe.train.seed)
    plans = assign_instructions(users, instructions, cfg, rng)
    tests = assign_eval_instructions(held_out[:cfg.eval_dialogs], instructions, cfg, rng) if cfg.eval_dialogs else []
    log(f"{report.summary('dialogs')}; {len(plans)} to sample, {len(tests)} held out for the evaluation")

    # 3-4. the current model samples the answers, with the instruction in every user message
    model, tokenizer = load(recipe, recipe.model.adapter)
    metrics = {"stage": "gatt", "instructions": cfg.instructions or "built-in", "dialogs": len(plans)}
    if tests:
        metrics["adherence_before"] = evaluate(model, tokenizer, tests, cfg)
    torch.manual_seed(recipe.train.seed)
    rows, dropped = sample(model, tokenizer, plans, cfg, log)
    del model
    memory_use.free_models()
    if not rows:
        raise UserError("gatt: every sampled dialog was dropped (its final answer failed the checks, or an answer was "
                        "empty); raise gatt.retries or check the instructions")
    runs.write_text(out / "gatt.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics.update(rows=len(rows), dropped_failed_checks=dropped["failed"], dropped_empty_answer=dropped["empty"],
                   short_form_rows=sum(r["short"] for r in rows), plain_rows=sum(not r["instructions"] for r in rows),
                   data={"train": vars(report)})
    log(f"{len(rows)} dialogs in {out / 'gatt.jsonl'}; dropped: {dropped['failed']} failed their checks after "
        f"{cfg.retries} retries, {dropped['empty']} had an empty answer")

    # 5. fine-tune on them, then measure again
    if train:
        sft_recipe = recipe.model_copy(update={"stage": "sft", "gatt": None, "output_dir": str(out / "sft"),
                                               "data": recipe.data.model_copy(update={
                                                   "train": [data.DataSource(path=str(out / "gatt.jsonl"),
                                                                             format="prompt_completion")],
                                                   "eval": None})})
        metrics["sft"] = {"output_dir": str(out / "sft"), "loss_last": sft_stage.run(sft_recipe, log=log)["loss_last"]}
        if tests:
            model, tokenizer = load(recipe, str(out / "sft"))
            metrics["adherence_after"] = evaluate(model, tokenizer, tests, cfg)
            del model
            memory_use.free_models()
    if tests:
        metrics["eval_dialogs"] = len(tests)
        log(table(metrics, cfg.eval_turns))
    runs.write_json(out / runs.METRICS_FILE, metrics)
    return metrics


# ---------------------------------------------------------------- planning (pure, seeded)


def assign_instructions(users: list[list[str]], instructions, cfg, rng: random.Random) -> list[dict]:
    """Per training dialog: its user turns cut to 1..max_turns, its instruction, and whether the system message
    is the short form."""
    plans = []
    for turns in users:
        if not turns:
            continue
        length = rng.randint(1, min(cfg.max_turns, len(turns)))
        combined = instructions_mod.draw(instructions, rng, cfg.combine)
        short, plain = rng.random() < cfg.short_probability, rng.random() < cfg.plain_fraction
        plans.append({"users": turns[:length], "instruction": instructions_mod.Combined() if plain else combined,
                      "short": short})
    return plans


def assign_eval_instructions(users: list[list[str]], instructions, cfg, rng: random.Random) -> list[dict]:
    """Held-out dialogs with gatt.eval_turns user turns (a shorter dialog's turns are repeated in order) and an
    instruction that has checks."""
    tests = []
    for turns in users:
        if turns:
            tests.append({"users": [turns[i % len(turns)] for i in range(cfg.eval_turns)],
                          "instruction": instructions_mod.draw(instructions, rng, cfg.combine, checked_only=True)})
    return tests


def with_instruction(users: list[str], instruction: str) -> list[str]:
    """The user messages as the sampler sees them: the instruction after a blank line in every one (none for a
    plain dialog, gatt.plain_fraction)."""
    return [f"{u}\n\n{instruction}" if instruction else u for u in users]


# ---------------------------------------------------------------- sampling


def sample(model, tokenizer, plans: list[dict], cfg, log) -> tuple[list[dict], dict]:
    """The dialogs answered by the model with the instruction in every user message; rows for gatt.jsonl."""
    options = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                   batch_size=cfg.batch_size)
    dialogs = [{"system": None, "users": with_instruction(p["users"], p["instruction"].text)} for p in plans]
    answers = sampling.converse(model, tokenizer, dialogs, **options)
    attempts = [1] * len(plans)
    for _ in range(cfg.retries):  # re-sample failing final answers, on the same history
        failing = [i for i, p in enumerate(plans) if p["instruction"].checks
                   and not instructions_mod.passes(answers[i][-1], p["instruction"].checks)]
        if not failing:
            break
        prompts = [sampling.history(None, dialogs[i]["users"], answers[i][:-1]) for i in failing]
        for i, new in zip(failing, sampling.generate(model, tokenizer, prompts, **options)):
            answers[i][-1] = new[0].text
            attempts[i] += 1
        log(f"re-sampled {len(failing)} final answers that failed their checks")
    rows, dropped = [], {"failed": 0, "empty": 0}
    for p, said, tries in zip(plans, answers, attempts):
        checks = p["instruction"].checks
        passed = instructions_mod.passes(said[-1], checks) if checks else None
        if passed is False:
            dropped["failed"] += 1
            continue
        if not all(a.strip() for a in said):
            dropped["empty"] += 1
            continue
        rows.append(training_row(p, said, tries, passed))
    return rows, dropped


def training_row(p: dict, answers: list[str], attempts: int, passed: bool | None) -> dict:
    """A prompt/completion row: the instruction only as the system message, clean user turns, the last answer
    as the completion (the only part trained)."""
    instruction = p["instruction"]
    short = bool(instruction.parts) and p["short"] and instruction.short != instruction.text  # where one exists
    system = (instruction.short if short else instruction.text) or None  # a plain dialog has no system message
    return {
        "prompt": sampling.history(system, p["users"], answers[:-1]),
        "completion": [{"role": "assistant", "content": answers[-1]}],
        "instructions": [part.text for part in instruction.parts],
        "system": system,
        "short": short,
        "checks": instruction.checks,
        "passed": passed,
        "attempts": attempts,
    }


# ---------------------------------------------------------------- evaluation


def evaluate(model, tokenizer, tests: list[dict], cfg) -> dict:
    """Adherence at each turn (the share of held-out dialogs whose greedy answer passes its checks), with the
    instruction only in the system message, in every user message, and nowhere."""
    results = {}
    for mode in MODES:
        dialogs = [{"system": t["instruction"].text if mode == "system" else None,
                    "users": with_instruction(t["users"], t["instruction"].text) if mode == "every" else t["users"]}
                   for t in tests]
        answers = sampling.converse(model, tokenizer, dialogs, greedy=True, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=cfg.batch_size)
        results[mode] = [sum(instructions_mod.passes(a[turn], t["instruction"].checks) for a, t in zip(answers, tests))
                         / len(tests) for turn in range(cfg.eval_turns)]
    return results


def table(metrics: dict, turns: int) -> str:
    labels = {"system": "system message only", "every": "in every user message", "none": "no instruction"}
    lines = [f"instruction followed, by turn ({metrics['eval_dialogs']} held-out dialogs, checked instructions)",
             f"{'':34}" + "".join(f"{t:>6}" for t in range(1, turns + 1))]
    for when in ("before", "after"):
        for mode, values in metrics.get(f"adherence_{when}", {}).items():
            lines.append(f"{when + ', ' + labels[mode]:34}" + "".join(f"{v:6.2f}" for v in values))
    return "\n".join(lines)


# ---------------------------------------------------------------- models


def load(recipe: Recipe, adapter: str | None):
    """The model (base + adapter) for sampling or evaluation, and its tokenizer."""
    tokenizer = models.load_tokenizer(adapter or recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    model = models.attach_lora(models.load_model(recipe.model), recipe.lora, adapter=adapter, gradient_checkpointing=False,
                               upcast_frozen=recipe.model.upcast_frozen)
    return model.eval(), tokenizer
