"""Wall time of one RL iteration: `llama-ft ppo`, `llama-ft ppo` with ppo.algorithm=grpo, and a plain TRL GRPO script.

All three run in this process, one after the other, on the same model, the same prompts (datasets/tiny_prompts.jsonl,
cycled), the same samples per step (--prompts x --samples answers, one optimiser step over all of them, one forward
micro-batch), the same answer length (--max-new-tokens) and the same rule reward (tests/reward_functions.py:brevity).
Each reports wall seconds per 16 answers of its training loop (model loading excluded) and the share of each phase:
generate, rewards, old log-probs, reference log-probs, values, advantages, optimiser (forward + backward + step).
llama-ft's PPO times its phases itself (metrics.json's `phase_seconds`); for the two TRL runs this script wraps
GRPOTrainer's `_generate`, `_calculate_rewards` and its no-grad `_get_per_token_logps_and_entropies` with timers
(with one step per generation, TRL skips the old log-probs: those calls are the reference's), and the rest of the
training loop is counted as the optimiser's. By default every answer is exactly --max-new-tokens long (the end of
turn is held back until then, in all three runs alike), so that the three do the same work on answers of the same
length; `--free-lengths` lets answers end where the model ends them (their mean length is then reported beside the
time, and differs between the runs). `--plan-gpu` adds `llama-ft plan`'s split of the PPO iteration
(sampling vs. training and scoring) for the same recipe on that GPU.

    python benchmarks/rl_speed.py                                   # the built-in tiny model (random weights)
    OMP_NUM_THREADS=1 python benchmarks/rl_speed.py --model ~/.cache/llama-ft-test-models/smollm2-135m-instruct \
        --iterations 3 --max-new-tokens 32 --repeats 3                  # the real model, as in docs/measurements.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REWARD = f"{ROOT / 'tests' / 'reward_functions.py'}:brevity"
PHASES = ("generate", "rewards", "old_logprobs", "reference_logprobs", "values", "advantages", "optimiser")


def overrides(args, work: Path, name: str, algorithm: str) -> list[str]:
    answers = args.prompts * args.samples
    return [f"model.name={args.model}", "model.adapter=null", f"model.quantization={args.quantization}",
            f"data.train={work / 'prompts.jsonl'}", "data.eval=null", "data.max_length=256", "data.skip_invalid=false",
            "ppo.reward_models=[]", "ppo.safety_model=null", f"ppo.reward_function={REWARD}",
            f"ppo.algorithm={algorithm}", f"ppo.batch_size={args.prompts}", f"ppo.samples_per_prompt={args.samples}",
            f"ppo.mini_batch_size={answers}", f"ppo.generation_batch_size={args.prompts}",
            f"ppo.max_new_tokens={args.max_new_tokens}", *(["ppo.kl_target=null"] if algorithm != "ppo" else []),
            f"train.batch_size={answers}", "train.gradient_accumulation_steps=1", "train.gradient_checkpointing=false",
            f"train.max_steps={args.iterations}", "train.save_steps=100000", "train.logging_steps=100000",
            "train.report_to=none", f"output_dir={work / name}"]


def equal_lengths() -> None:
    """Every generate call in this process writes exactly max_new_tokens: transformers' min_new_tokens holds the end
    of turn back until then. Both llama-ft's sampler and TRL's GRPOTrainer generate through GenerationMixin.generate."""
    from transformers import GenerationMixin

    original = GenerationMixin.generate

    def generate(model, *a, **kw):
        config = kw.get("generation_config") or model.generation_config
        kw["min_new_tokens"] = kw.get("max_new_tokens") or config.max_new_tokens
        return original(model, *a, **kw)

    GenerationMixin.generate = generate


class TRLPhases:
    """Seconds in GRPOTrainer's generation, reward and no-grad log-prob calls (the class's methods wrapped)."""

    def __init__(self):
        import torch
        from trl import GRPOTrainer

        from ft.stages.ppo import PhaseTimer

        self.timer = PhaseTimer()  # the clock of llama-ft ppo's phase_seconds, so both are timed alike
        for method, phase in (("_generate", "generate"), ("_calculate_rewards", "rewards"),
                              ("_get_per_token_logps_and_entropies", "reference_logprobs")):
            original = getattr(GRPOTrainer, method)

            def timed(trainer, *a, _original=original, _phase=phase, **kw):
                if _phase == "reference_logprobs" and torch.is_grad_enabled():  # the training forward: optimiser
                    return _original(trainer, *a, **kw)
                with self.timer(_phase):
                    return _original(trainer, *a, **kw)

            setattr(GRPOTrainer, method, timed)

    def take(self, total: float) -> dict:
        """The phases since the last take, the optimiser's being the rest of `total`."""
        out = {phase: self.timer.seconds.get(phase, 0.0) for phase in PHASES}
        self.timer.seconds = dict.fromkeys(self.timer.seconds, 0.0)
        out["optimiser"] = max(total - sum(out.values()), 0.0)
        return out


def run_llama_ft(args, work: Path, name: str, algorithm: str, phases: TRLPhases) -> dict:
    from ft import recipe as recipe_mod
    from ft.stages import ppo

    recipe = recipe_mod.load(ROOT / "recipes" / "ppo.yaml", overrides(args, work, name, algorithm))
    phases.take(0)
    metrics = ppo.run(recipe, log=lambda *a: None)
    seconds = metrics["train_seconds"]
    split = metrics.get("phase_seconds", {"optimiser": seconds}) if algorithm == "ppo" else phases.take(seconds)
    lengths = [h["answer_length"] for h in metrics["history"] if h.get("answer_length") is not None]
    return {"seconds": seconds, "phases": split, "answer_length": sum(lengths) / len(lengths) if lengths else None}


def run_plain_trl(args, work: Path, phases: TRLPhases) -> dict:
    """GRPO as TRL's documentation writes it: the model from transformers, a LoraConfig, GRPOTrainer. The tokenizer
    (and so the chat template and the prompts' tokens) is llama-ft's, so that the prompts are the same."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import GRPOConfig, GRPOTrainer

    from ft import models, recipe as recipe_mod, reward_model, tiny

    recipe = recipe_mod.load(ROOT / "recipes" / "ppo.yaml", overrides(args, work, f"plain-{args.repeat}", "grpo"))
    path = str(tiny.path()) if args.model == tiny.NAME else args.model
    tokenizer = models.load_tokenizer(path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=models.compute_dtype()) if args.quantization == "4bit" else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=models.compute_dtype(), quantization_config=quantization)
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=recipe.lora.target_modules, task_type="CAUSAL_LM")
    answers = args.prompts * args.samples
    config = GRPOConfig(output_dir=str(work / f"plain-{args.repeat}"), max_steps=args.iterations, learning_rate=recipe.train.learning_rate,
                        per_device_train_batch_size=answers, gradient_accumulation_steps=1, generation_batch_size=answers,
                        num_generations=args.samples, max_completion_length=args.max_new_tokens, beta=recipe.ppo.kl_coef,
                        temperature=1.0, top_p=1.0, top_k=0, num_iterations=1, report_to=[], save_strategy="no",
                        logging_steps=100000, use_cpu=not torch.cuda.is_available(), disable_dropout=True,
                        bf16=models.compute_dtype() == torch.bfloat16, fp16=models.compute_dtype() == torch.float16)
    rows = [line for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": json.loads(r)["prompt"]}]} for r in rows])
    rule = reward_model.load_reward_function(REWARD)

    def brevity(prompts, completions, **kwargs):  # TRL passes conversational completions as message lists
        return rule(prompts, [c[-1]["content"] for c in completions])

    trainer = GRPOTrainer(model=model, reward_funcs=[brevity], args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)
    phases.take(0)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e]
    return {"seconds": seconds, "phases": phases.take(seconds), "answer_length": sum(lengths) / len(lengths) if lengths else None}


def plan_split(args, work: Path, gpu: str) -> dict:
    """`llama-ft plan`'s estimate of the PPO iteration on `gpu`: the sampling phase's share and the training's."""
    from ft import plan, recipe as recipe_mod

    recipe = recipe_mod.load(ROOT / "recipes" / "ppo.yaml", overrides(args, work, "plan", "ppo"))
    made = plan.make(recipe, plan.parse_gpu(gpu))
    seconds = {p.name: p.seconds or 0.0 for p in made.phases}
    total = sum(seconds.values()) or 1.0
    return {name: round(s / total, 3) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama-2", help="A model folder or builtin:tiny-llama-2.")
    parser.add_argument("--quantization", default="none", choices=["none", "4bit"])
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per iteration.")
    parser.add_argument("--samples", type=int, default=4, help="Answers per prompt.")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--plan-gpu", default=None, help="Also print `llama-ft plan`'s PPO split on this GPU.")
    parser.add_argument("--only", default="ppo,grpo,trl", help="Which of ppo, grpo, trl to run.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each, interleaved; medians reported.")
    parser.add_argument("--free-lengths", action="store_true",
                        help="Let answers end at their end of turn (by default each is --max-new-tokens long).")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="rl-speed-"))
    source = (ROOT / "datasets" / "tiny_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    (work / "prompts.jsonl").write_text("\n".join(source[i % len(source)] for i in range(max(64, args.prompts))) + "\n")
    phases = TRLPhases()
    if not args.free_lengths:
        equal_lengths()
    runners = {"ppo": lambda: run_llama_ft(args, work, f"ppo-{args.repeat}", "ppo", phases),
               "grpo": lambda: run_llama_ft(args, work, f"grpo-{args.repeat}", "grpo", phases),
               "trl": lambda: run_plain_trl(args, work, phases)}
    names, answers = args.only.split(","), args.prompts * args.samples
    runs = {name: [] for name in names}  # one result per repeat, the three interleaved within each repeat
    for args.repeat in range(args.repeats):
        for name in names:
            result = runners[name]()
            result["per_16"] = result["seconds"] / args.iterations / answers * 16
            runs[name].append(result)
            print(f"repeat {args.repeat + 1}/{args.repeats} {name}: {result['per_16']:.3f} s per 16 answers")
    results = {}
    for name in names:
        median = statistics.median(r["per_16"] for r in runs[name])
        middle = min(runs[name], key=lambda r: abs(r["per_16"] - median))  # its phase shares are reported
        total = sum(middle["phases"].values()) or 1.0
        lengths = [r["answer_length"] for r in runs[name] if r["answer_length"] is not None]
        results[name] = {"seconds_per_16": round(median, 3), "each_repeat": [round(r["per_16"], 3) for r in runs[name]],
                         "answer_length": round(statistics.mean(lengths), 2) if lengths else None,
                         "share": {k: round(middle["phases"].get(k, 0.0) / total, 3) for k in PHASES}}
        print(f"{name:>5}: {results[name]['seconds_per_16']:.3f} s per 16 answers (median of {args.repeats}), answer "
              f"length {results[name]['answer_length']}, "
              + ", ".join(f"{k} {v:.0%}" for k, v in results[name]["share"].items() if v))
    if "trl" in results:
        for name in ("ppo", "grpo"):
            if name in results:  # the median of each repeat's ratio: a repeat's runs saw the same machine load
                ratios = [r["per_16"] / t["per_16"] for r, t in zip(runs[name], runs["trl"])]
                results[name]["x_plain_trl"] = round(statistics.median(ratios), 2)
                results[name]["x_plain_trl_each_repeat"] = [round(x, 2) for x in ratios]
                print(f"{name}: {results[name]['x_plain_trl']}x plain TRL GRPO (each repeat: "
                      f"{', '.join(f'{x:.2f}' for x in ratios)})")
    report = {"model": args.model, "quantization": args.quantization, "prompts": args.prompts, "samples": args.samples,
              "max_new_tokens": args.max_new_tokens, "equal_lengths": not args.free_lengths, "iterations": args.iterations,
              "repeats": args.repeats, "runs": results}
    if args.plan_gpu:
        report["plan_split"] = plan_split(args, work, args.plan_gpu)
        print(f"plan ({args.plan_gpu}): " + ", ".join(f"{k} {v:.0%}" for k, v in report["plan_split"].items()))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
