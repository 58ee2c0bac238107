"""Wall time of `llama-ft eval` against the plain `lm_eval` command on the same merged model and task.

Both run as a user runs them, each in a fresh process, on the same merged folder and the same task YAML, with the
chat template on (the merged model was tuned on dialogs) and the same number of examples:
  llama-ft eval MERGED --tasks TASK.yaml [--batch-size B]
  lm_eval --model hf --model_args pretrained=MERGED,dtype=float32 --tasks NAME --include_path DIR
          --apply_chat_template --fewshot_as_multiturn [--batch_size 1]   (lm_eval's default batch size)
and both accuracies are printed, so the two can be seen to score the same thing. Without --merged it first trains
recipes/tiny.yaml (about a minute or two on a CPU) and merges it, into a temporary folder.

Run:  python benchmarks/eval_speed.py [--merged DIR] [--task datasets/tiny_facts_mc.yaml] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", type=Path, help="A merged folder (default: train and merge recipes/tiny.yaml).")
    parser.add_argument("--task", type=Path, default=ROOT / "datasets" / "tiny_facts_mc.yaml")
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each command (the median is reported).")
    parser.add_argument("--batch-size", default="auto", help="llama-ft eval's --batch-size.")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    work = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    merged = args.merged
    if merged is None:
        run, merged = work / "run", work / "merged"
        print("training recipes/tiny.yaml and merging it (once) ...", flush=True)
        timed([sys.executable, str(ROOT / "cli.py"), "sft", "recipes/tiny.yaml", "--output-dir", str(run),
               "--set", "train.report_to=none"], ROOT, env)
        timed([sys.executable, str(ROOT / "cli.py"), "merge", str(run), "--output", str(merged)], ROOT, env)
    task = args.task.resolve()
    name = re.search(r"^task:\s*(\S+)", task.read_text(), re.MULTILINE).group(1)
    ours = [sys.executable, str(ROOT / "cli.py"), "eval", str(merged), "--tasks", str(task),
            "--batch-size", str(args.batch_size)]
    # plain lm_eval resolves the YAML's relative data_files against the current directory: run it from the YAML's
    lm_eval = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={merged},dtype=float32", "--tasks", name, "--include_path", str(task.parent),
               "--apply_chat_template", "--fewshot_as_multiturn", "--device", "cuda" if _cuda() else "cpu"]
    times = {"llama-ft eval": [], "lm_eval": []}
    accuracy = {}
    for _ in range(args.repeat):
        for label, command, cwd in (("llama-ft eval", ours, ROOT), ("lm_eval", lm_eval, task.parent)):
            seconds, out = timed(command, cwd, env)
            times[label].append(seconds)
            found = re.search(r"acc,none\s+([0-9.]+)", out) or re.search(r"\|acc\s*\|[^|]*\|\s*([0-9.]+)", out)
            accuracy[label] = float(found.group(1)) if found else None
    median = {label: statistics.median(ts) for label, ts in times.items()}
    report = {
        "merged": str(merged), "task": str(task), "repeat": args.repeat,
        "commands": {"llama-ft eval": " ".join(ours), "lm_eval": " ".join(lm_eval)},
        "seconds": times, "median_seconds": median, "accuracy": accuracy,
        "ratio_llama_ft_over_lm_eval": round(median["llama-ft eval"] / median["lm_eval"], 3),
    }
    print(json.dumps(report, indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
