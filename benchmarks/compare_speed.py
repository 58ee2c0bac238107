"""Wall time of `llama-ft compare` with its answers generated in batches vs one prompt at a time.

Both sides of the comparison are the same model (so one base serves both), judged by a rule reward (no reward
model to load); each configuration runs `ft.compare.run` end to end in this process, after one warm-up run, and
reports seconds and the speed-up of each batch size over --batch-size 1.

    python benchmarks/compare_speed.py                           # the built-in tiny model, 32 prompts, 32 new tokens
    python benchmarks/compare_speed.py --model runs/sft --prompts 64 --max-new-tokens 128   # a real run (a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama-2", help="Anything `llama-ft chat` takes.")
    parser.add_argument("--prompts", type=int, default=32, help="How many prompts (datasets/tiny_prompts.jsonl, cycled).")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8,16")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ft import compare

    source = (ROOT / "datasets" / "tiny_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    work = Path(tempfile.mkdtemp(prefix="compare-speed-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("\n".join(source[i % len(source)] for i in range(args.prompts)) + "\n", encoding="utf-8")
    judge = f"{ROOT / 'tests' / 'reward_functions.py'}:brevity"

    def once(batch_size: int, name: str) -> float:
        started = time.perf_counter()
        compare.run(args.model, args.model, prompts, reward_function=judge, max_new_tokens=args.max_new_tokens,
                    batch_size=batch_size, output=work / name, log=lambda m: None)
        return time.perf_counter() - started

    once(8, "warm-up")  # the first load reads the files from disk and builds the kernels
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    seconds = {size: once(size, f"batch-{size}") for size in sizes}
    base = seconds[sizes[0]]
    report = {"model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "answers": 2 * args.prompts,
              "runs": [{"batch_size": s, "seconds": round(t, 2), "speedup": round(base / t, 2)} for s, t in seconds.items()]}
    for row in report["runs"]:
        print(f"--batch-size {row['batch_size']:>3}: {row['seconds']:7.2f} s  ({row['speedup']:.2f}x)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
