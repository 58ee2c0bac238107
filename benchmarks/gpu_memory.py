"""GPU memory and speed of `llama-ft sft` against `llama-ft plan`, on random-weight models with Llama 2 7B's and 13B's
exact shapes (memory and speed do not depend on the weights' values). Needs a CUDA GPU and no download: the weights
are random, the tokenizer is the built-in tiny model's (its ids fit in Llama 2's 32,000-row embedding).

NOT RUN for this release: no GPU was available where it was built (see docs/fit.md). Run it on one:

    python benchmarks/gpu_memory.py --gpu t4 --sizes 7b,13b --steps 6 --json gpu_memory.json
    python benchmarks/gpu_memory.py --gpu t4 --sizes 7b --settings recipe --upcast-frozen false,true   # issue 19

Settings, each a `llama-ft sft recipes/chat.yaml` run with --set overrides and train.max_steps=--steps:
  recipe    batch 1 x 4096 tokens packed, gradient checkpointing (chat.yaml as shipped; 13B: as chat-13b.yaml)
  batch4    batch 4 x 1024 tokens packed, gradient checkpointing
  no-ckpt   batch 1 x 1024 tokens packed, no gradient checkpointing
each with every --upcast-frozen value: false (the default: embeddings, LM head and norms frozen in the compute dtype,
16-bit residual stream and checkpoints) and true (peft's float32 upcast, the old default), as model.upcast_frozen.
Reported per run: torch.cuda.max_memory_allocated (the stage's metrics.json, peak_memory_bytes) against the plan's
allocated bytes (its peak less the CUDA context and the allocator slack, which max_memory_allocated does not see),
tokens per second (all tokens of the training batches over trainer.train()'s wall time, warm-up included), and MFU:
tokens/s x the plan's FLOPs per token / the GPU's peak dense fp16/bf16 FLOPS.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "recipe": [],  # the recipe's own batch, length and checkpointing
    "batch4": ["train.batch_size=4", "data.max_length=1024"],
    "no-ckpt": ["data.max_length=1024", "train.gradient_checkpointing=false"],
}
RECIPE = {"7b": "recipes/chat.yaml", "13b": "recipes/chat-13b.yaml"}


def random_checkpoint(size: str, folder: Path) -> Path:
    """A Llama 2 checkpoint with random float16 weights and the exact shapes of the `size` model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ft import plan, tiny

    if (folder / "config.json").is_file():
        return folder
    s = plan.LLAMA2[size]
    config = LlamaConfig(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    for f in tiny.path().iterdir():  # the tiny model's tokenizer files
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def dialogs(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Long multi-turn chat dialogs (~1,500 tokens each) that fill 4,096-token packs."""
    from ft.tiny import WORDS

    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)) + "."

    with path.open("w") as f:
        for _ in range(n):
            messages = []
            for _ in range(4):
                messages += [{"role": "user", "content": text(60)}, {"role": "assistant", "content": text(250)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def run(size: str, setting: str, checkpoint: Path, data: Path, steps: int, gpu_key: str, work: Path,
        upcast_frozen: str = "false") -> dict:
    from ft import plan, recipe

    sets = [f"model.name={checkpoint}", f"data.train={data}", "data.eval=null", f"train.max_steps={steps}",
            "train.gradient_accumulation_steps=1", "train.save_steps=100000", "train.report_to=none",
            f"model.upcast_frozen={upcast_frozen}", *SETTINGS[setting]]
    out = work / f"{size}-{setting}-upcast-{upcast_frozen}"
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, str(ROOT / "cli.py"), "sft", RECIPE[size], "--output-dir", str(out), "--force"]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"size": size, "setting": setting, "upcast_frozen": upcast_frozen, "error": done.stderr[-2000:]}
    metrics = json.loads((out / "metrics.json").read_text())
    p = plan.make(recipe.load(ROOT / RECIPE[size], sets), plan.parse_gpu(gpu_key), advice=False)
    b = p.breakdown
    allocated = p.peak_bytes - b["cuda_context"] - b["allocator"]
    measured = metrics["peak_memory_bytes"]
    tokens_per_s = metrics["tokens"] / metrics["train_seconds"]
    flops = p.phases[0].flops_per_token
    gpu = plan.GPUS.get(gpu_key)
    return {"size": size, "setting": setting, "upcast_frozen": upcast_frozen, "measured_allocated_bytes": measured, "plan_allocated_bytes": allocated,
            "error": (allocated - measured) / measured, "tokens_per_second": tokens_per_s,
            "mfu": tokens_per_s * flops / (gpu.tflops * 1e12) if gpu and gpu.tflops else None,
            "plan_peak_bytes": p.peak_bytes, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", required=True, help="the plan's name for this GPU (t4, a100-40g, ...)")
    parser.add_argument("--sizes", default="7b,13b")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--upcast-frozen", default="false,true",
                        help="model.upcast_frozen values to measure, comma-separated (default: both)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llama-ft-gpu-memory")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    upcasts = args.upcast_frozen.split(",")
    if not set(upcasts) <= {"false", "true"}:
        parser.error(f"--upcast-frozen {args.upcast_frozen}: expected false, true or false,true")
    import datetime

    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_memory.py needs a CUDA GPU")
    args.work.mkdir(parents=True, exist_ok=True)
    data = dialogs(args.work / "dialogs.jsonl")
    rows = []
    for size in args.sizes.split(","):
        checkpoint = random_checkpoint(size, args.work / f"llama-2-{size}-random")
        for setting in args.settings.split(","):
            for upcast in upcasts:
                rows.append(run(size, setting, checkpoint, data, args.steps, args.gpu, args.work, upcast))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}")
    print("| model | setting | upcast_frozen | max_memory_allocated | plan (allocated) | error | tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "measured_allocated_bytes" in r:
            print(f"| {r['size']} | {r['setting']} | {r['upcast_frozen']} | {r['measured_allocated_bytes'] / 2**30:.2f} GiB | "
                  f"{r['plan_allocated_bytes'] / 2**30:.2f} GiB | {r['error']:+.1%} | {r['tokens_per_second']:.0f} | "
                  + (f"{r['mfu']:.1%} |" if r["mfu"] is not None else "- |"))
        else:
            print(f"| {r['size']} | {r['setting']} | {r['upcast_frozen']} | failed: {r['error'].splitlines()[-1] if r['error'] else ''} |")
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
