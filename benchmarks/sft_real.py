"""SFT speed on a real pretrained chat model: `llama-ft sft` against a plain TRL + PEFT script, in one run.

The model is SmolLM2-135M-Instruct (the tests' local copy, tests/smol.py: its ChatML template, pad = EOS as
published, byte-level BPE, tied embeddings), in 4-bit NF4 with double quantisation, LoRA r=16/alpha=32 on every
projection, one epoch over the same rows, batch 4, max_length 256, lr 2e-4 constant, adamw_torch, no gradient
checkpointing, seed 42; each configuration in its own process:

  plain-trl         SFTTrainer + peft_config on prompt/completion rows rendered by the model's own template (TRL's
                    completion-only loss: SmolLM2's template has no {% generation %} markers, so TRL's
                    assistant_only_loss cannot run on it); TRL's defaults otherwise: no packing
  plain-trl+pack    the same with SFTConfig(packing=True) (TRL's best-fit packing, padding-free batches)
  llama-ft          `llama-ft sft` on the same rows (prompt_completion format), data.packing=false
  llama-ft+pack     `llama-ft sft`, data.packing=true (the default)

Rows: single-answer dialogs of generated text (ft.tiny's words) with lognormal lengths, a third with a system
message, the same file for every configuration. One epoch each, so every configuration does the same work (the
packed ones in fewer, fuller sequences). Reported: wall time of trainer.train(), its ratio to the plain script's
(unpacked to unpacked, packed to packed), supervised tokens per second (tokens with a label: the answers and their
end of turn), and the padding share of the batches.

Run:  OMP_NUM_THREADS=1 python benchmarks/sft_real.py [--rows 24] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ft, from this clone
MAX_LENGTH, BATCH, LR, SEED = 256, 4, 2e-4, 42
LORA = dict(r=16, alpha=32, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
CONFIGS = ["plain-trl", "llama-ft", "plain-trl+pack", "llama-ft+pack"]


def smol_path() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import smol

    found = smol.path()
    if found is None:
        sys.exit(f"SmolLM2-135M-Instruct is not available: {smol.why_missing()}")
    return found


def make_rows(n: int, seed: int = SEED) -> list[dict]:
    """prompt/completion rows (conversational), with lengths that vary like chat data, well under MAX_LENGTH."""
    from ft.tiny import WORDS

    rng = random.Random(seed)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."

    def lognormal(median: float, sigma: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))

    rows = []
    for _ in range(n):
        prompt = [{"role": "system", "content": text(rng.randint(4, 12))}] if rng.random() < 0.33 else []
        prompt.append({"role": "user", "content": text(lognormal(12, 0.6, 3, 40))})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text(lognormal(40, 0.7, 3, 110))}]})
    return rows


def plain_trl(workdir: Path, model_dir: str, packing: bool, out_json: Path) -> None:
    """The plain TRL + PEFT script a user would write for this model (run in a child process)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from ft import memory_use

    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map={"": 0 if on_gpu else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32))
    dataset = load_dataset("json", data_files=str(workdir / "train.jsonl"), split="train")
    config = SFTConfig(
        output_dir=str(out_json.with_suffix("")), num_train_epochs=1, per_device_train_batch_size=BATCH, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch", gradient_checkpointing=False,
        bf16=on_gpu, use_cpu=not on_gpu, max_length=MAX_LENGTH, packing=packing, logging_steps=10,
        save_strategy="no", seed=SEED, report_to="none")
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    collator, seen = trainer.data_collator, []  # TRL's own collator, counting (supervised, total, padding) tokens

    def counting(examples):
        batch = collator(examples)
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else sum(len(e["input_ids"]) for e in examples)
        seen.append((int((batch["labels"] != -100).sum()), batch["input_ids"].numel(), batch["input_ids"].numel() - real))
        return batch

    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trained = seen[: trainer.state.global_step * config.gradient_accumulation_steps]
    supervised, tokens, padding = (sum(column) for column in zip(*trained))
    out_json.write_text(json.dumps({
        "train_seconds": seconds, "supervised_tokens": supervised, "tokens": tokens,
        "padding_fraction": padding / max(tokens, 1), "supervised_tokens_per_second": supervised / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else memory_use.peak_rss(),
        "global_step": trainer.state.global_step}))


def run_one(name: str, workdir: Path, model_dir: Path, index: int) -> dict:
    packing = name.endswith("+pack")
    if name.startswith("plain"):
        out = workdir / f"{name}-{index}.json"
        cmd = [sys.executable, __file__, "--_plain", str(workdir), "--_model", str(model_dir), "--_out", str(out)] \
            + (["--_pack"] if packing else [])
    else:
        run_dir = workdir / f"run-{name}-{index}"
        out = run_dir / "metrics.json"
        cmd = [sys.executable, str(ROOT / "cli.py"), "sft", str(workdir / "recipe.json"),
               "--set", f"data.packing={'true' if packing else 'false'}", "--output-dir", str(run_dir)]
    log = workdir / f"{name}-{index}.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"{name} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-25:]))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, interleaved; medians reported")
    parser.add_argument("--rows", type=int, default=24, help="rows in the generated data set (one epoch over them)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--_plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_model", type=str, help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_pack", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._plain:
        return plain_trl(args._plain, args._model, args._pack, args._out)

    from sft_throughput import machine  # this script's folder is on sys.path

    model_dir = smol_path()
    info = machine()
    print(f"machine: {info['cpus']} CPUs ({info['torch_threads']} torch threads), GPU: {info['gpu'] or 'none'}; "
          f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, peft {info['peft']}, "
          f"bitsandbytes {info['bitsandbytes']}")
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}")
    workdir = Path(tempfile.mkdtemp(prefix="sft-real-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(workdir / "hf-datasets"))
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows)))
    recipe = {
        "model": {"name": str(model_dir), "quantization": "4bit"}, "lora": LORA,
        "data": {"train": str(data), "max_length": MAX_LENGTH, "packing": False},
        "train": {"epochs": 1, "learning_rate": LR, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "optim": "adamw_torch", "batch_size": BATCH, "gradient_checkpointing": False,
                  "save_steps": 100000, "logging_steps": 10, "seed": SEED, "report_to": "none",
                  "generate_samples": 0},
        "output_dir": str(workdir / "unused"),
    }
    (workdir / "recipe.json").write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    print(f"work: SmolLM2-135M-Instruct 4-bit, {args.rows} rows, one epoch, batch {BATCH}, max_length {MAX_LENGTH}, "
          f"torch threads {info['torch_threads']}; files in {workdir}")
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for index in range(args.repeats):
        for name in CONFIGS:
            runs[name].append(run_one(name, workdir, model_dir, index))
            r = runs[name][-1]
            print(f"  {name} #{index + 1}: {r['train_seconds']:.1f} s, {r['global_step']} steps, "
                  f"{r['supervised_tokens_per_second']:.0f} supervised tok/s", flush=True)
    results = {name: {"train_seconds": statistics.median(r["train_seconds"] for r in rs),
                      "supervised_tokens_per_second": statistics.median(r["supervised_tokens_per_second"] for r in rs),
                      "supervised_tokens": rs[0]["supervised_tokens"], "tokens": rs[0]["tokens"],
                      "padding_fraction": rs[0]["padding_fraction"], "steps": rs[0]["global_step"]}
               for name, rs in runs.items()}
    header = f"{'config':<16}{'steps':>6}{'seconds':>9}{'time vs plain':>15}{'sup tok/s':>11}{'sup tokens':>12}{'padding':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        plain = results["plain-trl+pack" if name.endswith("+pack") else "plain-trl"]["train_seconds"]
        print(f"{name:<16}{r['steps']:>6}{r['train_seconds']:>9.1f}{r['train_seconds'] / plain:>14.2f}x"
              f"{r['supervised_tokens_per_second']:>11.0f}{r['supervised_tokens']:>12}{r['padding_fraction']:>9.1%}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "repeats": args.repeats, "rows": args.rows,
                                         "load_average": os.getloadavg(), "results": results}, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
