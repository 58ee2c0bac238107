"""`llama-ft compare A B`: head to head on a set of prompts, judged by reward models or a reward function.

How Llama 2 measured its RLHF iterations (the paper's Figure 11): both models answer every prompt, the reward
models judge each pair, and the result is the share of prompts A wins, ties and loses against B.

* A and B are anything `llama-ft chat` takes (a run folder, a merged folder, a checkpoint folder or Hub id). Each
  answers every prompt (the rows rejection sampling and PPO take) in the Llama 2 chat format, in batches, greedily
  by default (`temperature` 0); with sampling, both models draw from the same seed.
* The judge is exactly one of: reward model runs (the first is helpfulness; with a safety model the score is
  Llama 2's gated Rc, as in PPO and rejection sampling), or a Python function with TRL's reward signature. They
  score through the same code the training stages use (`ft.reward_model.Rewards`), so a score here is the score
  `llama-ft score` and PPO give.
* A prompt is a tie when the two answers are identical; with reward models when the Bradley-Terry probability
  sigmoid(r_A - r_B) is within `tie_margin` of 0.5; with a reward function when the scores are equal. Every
  fraction comes with its 95% Wilson score interval.
* Memory: one base serves everything that shares it. A and B on the same base are two adapters on one copy of it
  (a plain checkpoint that is the other's base is that base with the adapter switched off, quantised as the run
  was trained); reward models trained on that base are adapters + score heads on it too. Otherwise A answers, is
  freed, then B; the one that can host the reward models answers last and keeps its base for scoring. Never two
  full models at once (a reward model on a base of its own is loaded beside its host, as in PPO; the log says so).
* Output, in the output folder (default runs/compare/A-vs-B, numbered -2, -3, ... when taken; an earlier comparison
  is never overwritten): compare.json (the figures and the settings) and compare.jsonl (one row per prompt), both
  written atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ft import chat, chat_format, data, memory_use, models, runs
from ft.errors import UserError
from ft.recipe import DataSource, ModelSection
# sampling and scoring: the one implementation the training stages use
from ft.reward_model import Rewards, load_reward_function, reward_recipe, same_base, shared_rewards
from ft.sampling import generate

DEFAULT_TIE_MARGIN = 0.05  # a tie when |sigmoid(r_A - r_B) - 0.5| <= 0.05, i.e. |r_A - r_B| <= 0.20
DEFAULT_OUTPUT = Path("runs") / "compare"
RESULT_FILE, ROWS_FILE = "compare.json", "compare.jsonl"
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
INTERVAL = "Wilson score interval, 95%, for each fraction separately"


@dataclass
class Contestant:
    """One side of the comparison as it will be served: its base (quantised as served) and the run whose adapter
    goes on it (None for a plain checkpoint)."""

    label: str  # "A" or "B"
    spec: str  # as the user wrote it
    base: ModelSection
    adapter: str | None


def run(a: str, b: str, prompts_file: str | Path, *, reward_models: list[str] | None = None,
        safety_model: str | None = None, reward_function: str | None = None, tie_margin: float = DEFAULT_TIE_MARGIN,
        safety_threshold: float = 0.15, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256,
        batch_size: int = 8, seed: int = 0, output: str | Path | None = None, log=print) -> dict:
    """Compare A with B; writes compare.json and compare.jsonl and returns what compare.json holds."""
    reward_models = list(reward_models or [])
    # 1. everything the user gave is checked before any model loads
    if safety_model and not reward_models:
        raise UserError("--safety-model is combined with a helpfulness model: give --reward-model RUN too"
                        + (", not --reward-function" if reward_function else ""))
    if bool(reward_models) == bool(reward_function):
        raise UserError("give exactly one judge: --reward-model RUN (repeatable, with an optional --safety-model RUN) "
                        "or --reward-function FILE.py:NAME")
    if not 0 <= tie_margin < 0.5:
        raise UserError(f"--tie-margin {tie_margin}: expected a number in [0, 0.5) (distance of sigmoid(r_A - r_B) from 0.5)")
    if not 0 <= safety_threshold <= 1:
        raise UserError(f"--safety-threshold {safety_threshold}: expected a probability in [0, 1]")
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or batch_size < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens and --batch-size >= 1")
    function = _reward_function(reward_function) if reward_function else None
    for judge in reward_models + ([safety_model] if safety_model else []):
        reward_recipe(judge)
    prompts, report = data.load_prompts([DataSource(path=str(prompts_file))], skip_invalid=False)
    log(report.summary(f"prompts ({prompts_file})"))
    contestants = [contestant("A", a), contestant("B", b)]
    out = output_dir(output, a, b)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)  # reserves a default name before the long part
    except OSError as e:
        raise UserError(f"--output {out}: cannot create it ({e.strerror or e})") from None
    try:
        result, rows = _compare(contestants, prompts, function, reward_models, safety_model, out, log,
                          sampling=dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, seed=seed),
                          tie_margin=tie_margin, safety_threshold=safety_threshold)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    result["settings"].update({"a": a, "b": b, "prompts": str(prompts_file), "reward_models": reward_models,
                               "safety_model": safety_model, "reward_function": reward_function})
    runs.write_text(out / ROWS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    runs.write_json(out / RESULT_FILE, result)  # last: a folder with a compare.json holds a finished comparison
    return result


def contestant(label: str, spec: str) -> Contestant:
    """What A or B is, by the forms `llama-ft chat` takes (see chat.load), without loading it."""
    folder = Path(spec).expanduser()
    if runs.is_run(folder):
        recipe = runs.read_recipe(folder)
        if not runs.is_chat_model(recipe):
            raise UserError(f"{label} = {spec} is a reward model: judge with --reward-model {spec}, compare chat models")
        return Contestant(label, spec, recipe.model.model_copy(update={"adapter": None}), str(folder))
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"{label} = {spec}: neither an llama-ft run folder (recipe.yaml + adapter) nor a model "
                        "(config.json); a rejection or gatt run keeps its trained adapter in its sft/ folder")
    models.resolve(spec)  # a misspelt folder fails here, before anything loads
    return Contestant(label, spec, ModelSection(name=spec, quantization="none"), None)


def shared_base(a: Contestant, b: Contestant) -> bool:
    """Whether one copy of a base serves both: the same checkpoint, and the same quantisation when both are runs
    (a plain checkpoint that is a run's base is served as that base with the adapter off)."""
    if models.checkpoint_id(a.base.name) != models.checkpoint_id(b.base.name):
        return False
    return a.base.quantization == b.base.quantization if a.adapter and b.adapter else True


def output_dir(output: str | Path | None, a: str, b: str) -> Path:
    """--output as given (refused if it holds an earlier comparison), or a new runs/compare/A-vs-B[-N]."""
    if output is not None:
        out = Path(output).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"--output {out}: exists and is not a folder")
        taken = [name for name in (RESULT_FILE, ROWS_FILE) if (out / name).exists()]
        if taken:
            raise UserError(f"--output {out}: holds an earlier comparison ({taken[0]}); choose another folder")
        return out
    stem = DEFAULT_OUTPUT / f"{_slug(a)}-vs-{_slug(b)}"
    out, number = stem, 1
    while out.exists():
        number += 1
        out = stem.with_name(f"{stem.name}-{number}")
    return out


def _slug(spec: str) -> str:
    name = re.split(r"[/:\\]", spec.rstrip("/\\"))[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _reward_function(spec: str):
    with _flag_names():
        return load_reward_function(spec)


@contextlib.contextmanager
def _flag_names():
    """The reward function's errors, naming this command's flag instead of the recipe key PPO reads it from."""
    try:
        yield
    except UserError as e:
        raise UserError(str(e).replace("ppo.reward_function", "--reward-function")) from None


# ---------------------------------------------------------------- answers, scores, verdicts


def _compare(contestants, prompts, function, reward_models, safety_model, out, log, *, sampling, tie_margin,
             safety_threshold) -> tuple[dict, list[dict]]:
    shared = shared_base(*contestants)
    answers, loaded = _answer(contestants, shared, prompts, reward_models, safety_model, sampling, log)
    combined, parts = _score(loaded, answers, prompts, function, reward_models, safety_model, safety_threshold,
                             sampling["batch_size"], log)

    # verdicts: overall (Llama 2's Rc with a safety model), and by each judge alone
    n, probabilistic = len(prompts), function is None
    same = [x.text == y.text for x, y in zip(answers["A"], answers["B"])]
    overall = [verdict(s, sa, sb, tie_margin, probabilistic) for s, sa, sb in zip(same, combined[:n], combined[n:])]
    by_judge = {name: [verdict(s, sa, sb, tie_margin, probabilistic) for s, sa, sb in zip(same, v[:n], v[n:])]
                for name, v in parts.items()}
    rows = [{"prompt": p["prompt"], "origin": p["origin"], "safety": p["safety"],
             "answer_a": answers["A"][i].text, "answer_b": answers["B"][i].text,
             "ended_a": answers["A"][i].ended, "ended_b": answers["B"][i].ended,
             "score_a": combined[i], "score_b": combined[n + i], "verdict": overall[i],
             "judges": {name: {"score_a": v[i], "score_b": v[n + i], "verdict": by_judge[name][i]}
                        for name, v in parts.items()}}
            for i, p in enumerate(prompts)]

    result = {**summary(overall, combined[:n], combined[n:]), "n": n, "interval": INTERVAL,
              "identical_answers": sum(same),
              "judges": {name: summary(by_judge[name], v[:n], v[n:]) for name, v in parts.items()}}
    if safety_model:
        safety = parts["safety"]
        result["judges"]["safety"]["flagged"] = {side: sum(sigmoid(s) < safety_threshold for s in values) / n
                                                 for side, values in (("A", safety[:n]), ("B", safety[n:]))}
    result["judge"] = ("reward function" if function else
                       "reward models: helpfulness" + (" gated by safety (Llama 2's Rc)" if safety_model else ""))
    result["models"] = {c.label: {"model": c.spec, "base": c.base.name, "quantization": c.base.quantization,
                                  "adapter": c.adapter} for c in contestants}
    result["models"]["shared_base"] = shared
    result["settings"] = {**sampling, "greedy": sampling["temperature"] == 0, "tie_margin": tie_margin,
                          "safety_threshold": safety_threshold, "versions": _versions()}
    result["files"] = {"rows": str(out / ROWS_FILE), "result": str(out / RESULT_FILE)}
    return result, rows


def _answer(contestants, shared, prompts, reward_models, safety_model, sampling, log):
    """Both sides' answers ({"A": [Completion], "B": [...]}), and the model still loaded, as a dict (model, tokenizer,
    section) that the scoring empties: the model is freed as soon as nothing needs it."""
    if shared:
        # one copy of the base: the side with an adapter is loaded as chat loads it, the other side's adapter added
        host = next((c for c in contestants if c.adapter), contestants[0])
        model, tokenizer = _load(host)
        views = {}
        for c in contestants:
            if c.adapter is None:
                c.base, views[c.label] = host.base, None  # served as the host's base, quantised as it was trained
            elif Path(c.adapter).resolve() == Path(host.adapter).resolve():
                views[c.label] = "default"
            else:
                models.add_adapter(model, f"compare_{c.label}", run_dir=c.adapter)
                views[c.label] = f"compare_{c.label}"
        log(f"A and B on one base ({host.base.name}, {host.base.quantization}): " + ", ".join(
            f"{c.label} {'with its adapter' if views[c.label] else 'the base' + (', adapter off' if host.adapter else '')}"
            for c in contestants))
        answers = {}
        for c in contestants:
            with _serving(model, views[c.label]):
                answers[c.label] = _generate(c, model, tokenizer, prompts, log, **sampling)
        return answers, {"model": model, "tokenizer": tokenizer, "section": host.base}
    # one model at a time; the one whose base can carry the reward models answers last and stays for scoring
    log("A and B on different bases: one loaded at a time")
    first, last = sorted(contestants, key=lambda c: _hosts_judges(c, reward_models, safety_model))
    model, tokenizer = _load(first)
    answers = {first.label: _generate(first, model, tokenizer, prompts, log, **sampling)}
    del model
    memory_use.free_models()
    model, tokenizer = _load(last)
    answers[last.label] = _generate(last, model, tokenizer, prompts, log, **sampling)
    return answers, {"model": model, "tokenizer": tokenizer, "section": last.base}


def _score(loaded, answers, prompts, function, reward_models, safety_model, threshold, batch_size, log):
    """(overall scores, {judge: scores}) of A's answers then B's: the reward function; or the reward models on the
    loaded base when they share it, else on their own base after the loaded model is freed."""
    model = loaded.pop("model")
    judges = reward_models + ([safety_model] if safety_model else [])
    if function is not None or not (hasattr(model, "peft_config") and any(same_base(run, loaded["section"]) for run in judges)):
        model = None  # the last reference: freed before anything else loads
        memory_use.free_models()
    if function is not None:
        rewards = Rewards(function=function, threshold=threshold)
    else:
        if model is None:
            model, loaded["tokenizer"], loaded["section"] = _judge_host(reward_models[0])
        rewards, _, _ = shared_rewards(model, loaded["tokenizer"], loaded["section"], reward_models, safety_model,
                                       threshold=threshold, batch_size=batch_size, log=log)
    messages, flags = [p["prompt"] for p in prompts], [p["safety"] for p in prompts]
    with _flag_names():
        scores = rewards(messages + messages, [c.text for c in answers["A"] + answers["B"]], flags + flags)
    del rewards, model
    memory_use.free_models()
    return scores


def _load(c: Contestant):
    model, tokenizer = chat.load(c.spec)
    models.exact_4bit_kernels(model)  # before its first forward: scores on this base then equal `llama-ft score`'s
    return model, tokenizer


def _serving(model, adapter: str | None):
    """The model as one contestant: its adapter active, or (a plain checkpoint on a shared base) adapters off."""
    if adapter is not None:
        return models.use_adapter(model, adapter)
    return model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()


def _hosts_judges(c: Contestant, reward_models: list[str], safety_model: str | None) -> bool:
    judges = reward_models + ([safety_model] if safety_model else [])
    return c.adapter is not None and any(same_base(run, c.base) for run in judges)


def _generate(c: Contestant, model, tokenizer, prompts, log, *, temperature, top_p, max_new_tokens, batch_size, seed):
    """Every prompt answered by `model`, batch_size prompts at a time, from the same seed for either side."""
    import torch

    context = min(getattr(model.config, "max_position_embeddings", chat.CONTEXT), chat.CONTEXT)
    for p in prompts:
        length = len(chat_format.prompt_ids(tokenizer, p["prompt"]))
        if length + max_new_tokens > context:
            raise UserError(f"{p['origin']}: the prompt has {length} tokens; with --max-new-tokens {max_new_tokens} "
                            f"it exceeds the {context}-token context. Shorten it or lower --max-new-tokens")
    torch.manual_seed(seed)
    done = []
    for start in range(0, len(prompts), batch_size):
        batch = [p["prompt"] for p in prompts[start:start + batch_size]]
        done += [out[0] for out in generate(model, tokenizer, batch, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, batch_size=batch_size,
                                            greedy=temperature == 0)]
        log(f"{c.label} ({c.spec}): answered {len(done)}/{len(prompts)} prompts")
    return done


def _judge_host(run: str):
    """(model, tokenizer, base section) for reward models whose base no contestant shares: that base, with the reward
    adapters to come beside an unused zero-initialised LoRA (a PeftModel to carry them; one copy of the base)."""
    section = reward_recipe(run).model.model_copy(update={"adapter": None})
    tokenizer = models.load_tokenizer(run, trust_remote_code=section.trust_remote_code)
    model = models.attach_lora(models.load_model(section), runs.lora_shape(run), gradient_checkpointing=False)
    return model, tokenizer, section


def rejudge(rows: list[dict], rewards: Rewards, *, tie_margin: float = DEFAULT_TIE_MARGIN) -> dict:
    """The figures of compare.jsonl's rows (A's and B's answers) by another judge: win / tie / loss of A with their
    intervals and each side's mean score, as compare.json has them per judge. The answers are not generated again."""
    n = len(rows)
    prompts, flags = [r["prompt"] for r in rows], [r["safety"] for r in rows]
    with _flag_names():
        scores, _ = rewards(prompts + prompts, [r["answer_a"] for r in rows] + [r["answer_b"] for r in rows],
                            flags + flags)
    probabilistic = rewards.function is None
    verdicts = [verdict(r["answer_a"] == r["answer_b"], a, b, tie_margin, probabilistic)
                for r, a, b in zip(rows, scores[:n], scores[n:])]
    return {**summary(verdicts, scores[:n], scores[n:]), "n": n, "interval": INTERVAL}


def verdict(identical: bool, score_a: float, score_b: float, tie_margin: float, probabilistic: bool) -> str:
    """'win', 'tie' or 'loss' of A over B on one prompt (see the module docstring for the tie rule)."""
    if identical:
        return "tie"
    if probabilistic:
        p = sigmoid(score_a - score_b)
        return "tie" if abs(p - 0.5) <= tie_margin else ("win" if p > 0.5 else "loss")
    return "tie" if score_a == score_b else ("win" if score_a > score_b else "loss")


def summary(verdicts: list[str], scores_a: list[float], scores_b: list[float]) -> dict:
    """Fractions of win / tie / loss with their counts and intervals, and each side's mean score."""
    n = len(verdicts)
    counts = {k: verdicts.count(k) for k in ("win", "tie", "loss")}
    return {**{k: c / n for k, c in counts.items()}, "counts": counts,
            "intervals": {k: wilson(c, n) for k, c in counts.items()},
            "mean_score": {"A": sum(scores_a) / n, "B": sum(scores_b) / n}}


def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval of a binomial fraction k / n (sound near 0 and 1, unlike the normal one)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _versions() -> dict:
    from importlib.metadata import version

    import ft

    return {"llama-ft": ft.__version__, **{name: version(name) for name in ("torch", "transformers", "peft")}}


# ---------------------------------------------------------------- the table


def table(result: dict) -> str:
    """compare.json as a table: one line for the overall verdict and one per judge."""
    pct = lambda x: f"{100 * x:5.1f}%"
    cell = lambda part, k: f"{pct(part[k])} [{100 * part['intervals'][k][0]:4.1f}, {100 * part['intervals'][k][1]:5.1f}]"
    flagged = "flagged" in result["judges"].get("safety", {})
    head = f"{'':<14}{'A wins':<22}{'tie':<22}{'B wins':<22}{'mean A':>9}{'mean B':>9}"
    lines = [f"A: {result['models']['A']['model']}    B: {result['models']['B']['model']}",
             f"{result['n']} prompts, judged by {result['judge']}; {INTERVAL} in brackets", "",
             head + (f"{'flagged A':>11}{'flagged B':>11}" if flagged else "")]
    for name, part in [("overall", result), *result["judges"].items()]:
        line = (f"{name:<14}" + "".join(f"{cell(part, k):<22}" for k in ("win", "tie", "loss"))
                + f"{part['mean_score']['A']:>9.3f}{part['mean_score']['B']:>9.3f}")
        if "flagged" in part:
            line += f"{pct(part['flagged']['A']):>11}{pct(part['flagged']['B']):>11}"
        lines.append(line)
    if result["identical_answers"]:
        lines.append(f"\n{result['identical_answers']} of {result['n']} prompts got identical answers (ties)")
    return "\n".join(lines)
