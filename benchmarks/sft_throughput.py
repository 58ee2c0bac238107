"""SFT throughput: a plain TRL script against `llama-ft sft`, on the same data, model and machine.

Measures, for the same number of optimiser steps of the same QLoRA work (built-in tiny Llama 2
model in 4-bit NF4 with double quantisation, LoRA r=16/alpha=32 on every projection, batch 8,
max_length 512, lr 2e-4 constant, adamw_torch, no gradient checkpointing, seed 42):

  * supervised tokens per second (tokens with a label != -100, i.e. the assistant answers and
    their EOS, divided by the wall time of trainer.train()),
  * the fraction of the tokens in the training batches that are padding,
  * peak memory (peak process RSS, VmHWM, on the CPU; torch.cuda.max_memory_allocated() on a GPU).

Configurations, each run in its own subprocess (so peak RSS is per run):
  plain-trl       a straightforward TRL script as a user would write it (TRL defaults: no packing,
                  random sampling, padding to the longest sequence of each batch)
  llama-ft        `llama-ft sft` with data.packing=false (it uses group_by_length sampling then)
  llama-ft+pack   `llama-ft sft` with data.packing=true (BFD packing, padding-free)

The data is a generated JSONL of chat dialogs (messages format) whose lengths vary like real chat
data: lognormal answer lengths, some two-turn dialogs, some system messages (seeded).

Run:  python benchmarks/sft_throughput.py --steps 20 --repeats 1 [--dialogs 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_LENGTH, BATCH, LR, SEED = 512, 8, 2e-4, 42
LORA = dict(r=16, alpha=32, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
CONFIGS = ["plain-trl", "llama-ft", "llama-ft+pack"]


# ---------------------------------------------------------------- data


def make_dialogs(n: int, seed: int = SEED, word_budget: int = 300) -> list[dict]:
    """Chat dialogs with realistic length spread; word_budget keeps each one well under MAX_LENGTH tokens."""
    from ft.tiny import WORDS

    rng = random.Random(seed)

    def text(n_words: int) -> str:
        sentences, left = [], n_words
        while left > 0:
            k = min(left, rng.randint(5, 16))
            words = [rng.choice(WORDS) for _ in range(k)]
            sentences.append(" ".join([words[0].capitalize()] + words[1:]) + rng.choice([".", ".", ".", "?", "!"]))
            left -= k
        return " ".join(sentences)

    def lognormal(median: float, sigma: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))

    dialogs = []
    for _ in range(n):
        messages, budget = [], word_budget
        if rng.random() < 0.3:
            words = rng.randint(5, 20)
            messages.append({"role": "system", "content": text(words)})
            budget -= words
        for _turn in range(2 if rng.random() < 0.2 else 1):
            prompt = min(lognormal(15, 0.7, 3, 80), max(budget - 5, 3))
            answer = min(lognormal(60, 0.8, 3, 400), max(budget - prompt, 3))
            messages += [{"role": "user", "content": text(prompt)}, {"role": "assistant", "content": text(answer)}]
            budget -= prompt + answer
            if budget < 20:
                break
        dialogs.append({"messages": messages})
    return dialogs


def write_inputs(workdir: Path, args) -> Path:
    data = workdir / "train.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for dialog in make_dialogs(args.dialogs):
            f.write(json.dumps(dialog) + "\n")
    recipe = {
        "model": {"name": "builtin:tiny-llama-2", "quantization": "4bit"},
        "lora": LORA,
        "data": {"train": str(data), "max_length": MAX_LENGTH, "packing": False},
        "train": {"max_steps": args.steps, "learning_rate": LR, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "optim": "adamw_torch", "batch_size": BATCH, "gradient_checkpointing": False,
                  "save_steps": args.steps + 1000, "logging_steps": 10, "seed": SEED, "report_to": "none",
                  "generate_samples": 0},
        "output_dir": str(workdir / "unused"),
    }
    (workdir / "recipe.json").write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    return data


def data_stats(data: Path) -> str:
    from transformers import AutoTokenizer

    from ft import tiny

    tok = AutoTokenizer.from_pretrained(str(tiny.path()))
    rows = [json.loads(line) for line in data.open(encoding="utf-8")]
    lengths = sorted(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows)
    q = lambda p: lengths[min(len(lengths) - 1, int(p * len(lengths)))]  # noqa: E731
    return (f"{len(rows)} dialogs, tokens per dialog: median {q(0.5)}, p90 {q(0.9)}, max {lengths[-1]}, "
            f"{sum(len(r['messages']) > 3 for r in rows)} multi-turn, {sum(r['messages'][0]['role'] == 'system' for r in rows)} with system")


# ---------------------------------------------------------------- the plain TRL script (child process)


def plain_trl(workdir: Path, steps: int, out_json: Path) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ft import memory_use, tiny

    class CountingCollator(DataCollatorForLanguageModeling):
        """TRL's collator, recording (supervised, total, padding) tokens of each batch it builds."""

        def torch_call(self, examples):
            batch = super().torch_call(examples)
            self.seen.append((int((batch["labels"] != -100).sum()), batch["input_ids"].numel(),
                              int((batch["attention_mask"] == 0).sum())))
            return batch

    on_gpu = torch.cuda.is_available()
    folder = str(tiny.path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32,
        ),
        device_map={"": 0 if on_gpu else "cpu"},
    )
    dataset = load_dataset("json", data_files=str(workdir / "train.jsonl"), split="train")
    collator = CountingCollator(pad_token_id=tokenizer.pad_token_id)
    collator.seen = []
    config = SFTConfig(
        output_dir=str(out_json.with_suffix("")), max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        gradient_checkpointing=False, bf16=on_gpu, use_cpu=not on_gpu,  # as llama-ft maps them (no bf16 autocast on CPU)
        max_length=MAX_LENGTH, assistant_only_loss=True, logging_steps=10, save_steps=steps + 1000,
        seed=SEED, report_to="none",
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=collator, peft_config=peft_config)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    # The dataloader may build one batch ahead of the one trained on: count the batches actually trained.
    trained = collator.seen[: trainer.state.global_step * config.gradient_accumulation_steps]
    supervised, tokens, padding = (sum(column) for column in zip(*trained))
    rss = memory_use.peak_rss()
    out_json.write_text(json.dumps({
        "train_seconds": seconds, "supervised_tokens": supervised, "tokens": tokens,
        "padding_fraction": padding / max(tokens, 1), "supervised_tokens_per_second": supervised / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else rss,
        "global_step": trainer.state.global_step,
    }))


# ---------------------------------------------------------------- orchestration


def run_one(name: str, workdir: Path, args, index: int) -> dict:
    run_dir = workdir / f"run-{name}-{index}"
    if name == "plain-trl":
        out = workdir / f"plain-{index}.json"
        cmd = [sys.executable, __file__, "--_plain", str(workdir), "--steps", str(args.steps), "--_out", str(out)]
    else:
        out = run_dir / "metrics.json"
        exe = Path(sys.executable).with_name("llama-ft")
        cmd = [str(exe) if exe.exists() else shutil.which("llama-ft") or "llama-ft", "sft", str(workdir / "recipe.json"),
               "--set", f"data.packing={'true' if name.endswith('+pack') else 'false'}", "--output-dir", str(run_dir)]
    log = workdir / f"{name}-{index}.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"{name} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-25:]))
    return json.loads(out.read_text())


def machine() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per run (default 20)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the median tok/s is reported")
    parser.add_argument("--dialogs", type=int, default=512, help="dialogs in the generated data set")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, recipe, run logs)")
    parser.add_argument("--_plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._plain:
        return plain_trl(args._plain, args.steps, args._out)

    info = machine()
    print(f"machine: {info['cpus']} CPUs ({info['torch_threads']} torch threads), GPU: {info['gpu'] or 'none'}, "
          f"{info['platform']}")
    print(f"versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"trl {info['trl']}, peft {info['peft']}, bitsandbytes {info['bitsandbytes']}")
    load = os.getloadavg()[0]
    print(f"load average (1 min): {load:.2f}" + ("  WARNING: the machine is busy, timings will be noisy" if load > 0.5 else ""))
    workdir = Path(tempfile.mkdtemp(prefix="sft-throughput-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(workdir / "hf-datasets"))
    data = write_inputs(workdir, args)
    print(f"data: {data_stats(data)}")
    print(f"work: {args.steps} steps x batch {BATCH}, max_length {MAX_LENGTH}, {args.repeats} repeat(s); files in {workdir}")

    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for index in range(args.repeats):  # interleaved, so slow drift of the machine hits every configuration alike
        for name in CONFIGS:
            runs[name].append(run_one(name, workdir, args, index))
            print(f"  {name} #{index + 1}: {runs[name][-1]['supervised_tokens_per_second']:.0f} supervised tok/s", flush=True)

    results = {}
    for name, rs in runs.items():
        results[name] = {
            "supervised_tokens_per_second": statistics.median(r["supervised_tokens_per_second"] for r in rs),
            "all_supervised_tokens_per_second": [r["supervised_tokens_per_second"] for r in rs],
            "padding_fraction": rs[0]["padding_fraction"], "supervised_tokens": rs[0]["supervised_tokens"],
            "tokens": rs[0]["tokens"], "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rs),
            "train_seconds": statistics.median(r["train_seconds"] for r in rs),
        }
    base = results["plain-trl"]["supervised_tokens_per_second"]
    header = f"{'config':<15}{'sup tok/s':>11}{'vs plain':>10}{'padding':>9}{'peak MiB':>10}{'sup tokens':>12}{'seconds':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(f"{name:<15}{r['supervised_tokens_per_second']:>11.0f}{r['supervised_tokens_per_second'] / base:>9.2f}x"
              f"{r['padding_fraction']:>9.1%}{r['peak_memory_bytes'] / 2**20:>10.0f}{r['supervised_tokens']:>12}"
              f"{r['train_seconds']:>9.1f}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} (the runs themselves use ~{info['torch_threads']})")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "steps": args.steps, "repeats": args.repeats,
                                         "dialogs": args.dialogs, "results": results}, indent=2))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
