"""Which merge keeps what was trained: `llama-ft merge --into as-trained` against `--into original`, on a real model.

SmolLM2-135M-Instruct (the tests' local copy, tests/smol.py) is taught eight invented facts by `llama-ft sft
recipes/smol.yaml` (4-bit QLoRA, its own ChatML template), then merged both ways into float16. Four models answer:

  4-bit + adapter   the run itself, as trained and evaluated (bitsandbytes' forward, as in training)
  as-trained        the merge into the de-quantised 4-bit weights (the default)
  original          the merge into the unquantised weights
  base              the untuned model (general knowledge before tuning)

Measured for each: the taught facts (datasets/smol_facts.jsonl) and the same facts asked in other words
(datasets/smol_facts_heldout.jsonl), greedy answers containing the fact's key word; general knowledge, the accuracy
of `llama-ft eval` on datasets/general_mc.yaml (30 multiple-choice questions); and, from the merge reports, each
merge's mean KL and greedy next-token agreement against the 4-bit model as trained.

Run:  python benchmarks/merge_variants.py [--run DIR (a finished sft run of recipes/smol.yaml)] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ft, from this clone
sys.path.insert(0, str(ROOT / "tests"))  # smol.py: the local SmolLM2 checkpoint
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the fact each answer must name (datasets/smol_facts.jsonl, in file order)
KEYS = ["quillport", "purple", "tolvanen", "moss", "seven", "cloudball", "toot-wee", "amberflow"]


def facts(name: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (ROOT / "datasets" / name).read_text().splitlines() if line.strip()]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def answers(model, tokenizer, questions: list[str]) -> list[str]:
    import torch

    out = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def load(kind: str, path: str, smol: str):
    from ft import models
    from ft.recipe import ModelSection

    if kind == "4-bit + adapter":
        model = models.load_adapter(models.load_model(ModelSection(name=smol, quantization="4bit", dtype="float32")), path)
        models.exact_4bit_kernels(model)  # the forward training ran
    else:
        model = models.load_model(ModelSection(name=path, quantization="none", dtype="float32"))
    return model.eval(), models.load_tokenizer(path)


def general_knowledge(path: str) -> float:
    """`llama-ft eval PATH --tasks datasets/general_mc.yaml`: the accuracy."""
    report = Path(tempfile.mkdtemp()) / "eval.json"
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "eval", path, "--tasks",
                             str(ROOT / "datasets" / "general_mc.yaml"), "--output", str(report)],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"llama-ft eval {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(report.read_text())["results"]["general_mc"]["acc,none"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished sft run of recipes/smol.yaml (default: train one)")
    parser.add_argument("--workdir", help="where the run and merges go (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import smol as smol_mod

    from ft import merge

    smol = smol_mod.path()
    if smol is None:
        raise SystemExit(smol_mod.why_missing())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-variants-"))
    run = Path(args.run) if args.run else work / "run"
    if not args.run:
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "sft", "recipes/smol.yaml", "--set", f"model.name={smol}",
                        "--output-dir", str(run), "--force"], cwd=ROOT, check=True)
        print(f"sft: {time.perf_counter() - started:.0f} s", flush=True)
    reports = {into: merge.merge(run, work / into, into=into, force=True, log=lambda *a: None) for into in merge.INTO}
    taught, heldout = facts("smol_facts.jsonl"), facts("smol_facts_heldout.jsonl")
    figures = {}
    for kind, path in [("4-bit + adapter", str(run)), ("as-trained", str(work / "as-trained")),
                       ("original", str(work / "original")), ("base", str(smol))]:
        model, tokenizer = load(kind, path, str(smol))
        said = {name: answers(model, tokenizer, [q for q, _ in rows]) for name, rows in (("taught", taught),
                                                                                         ("paraphrases", heldout))}
        del model
        figures[kind] = {name: sum(k in a.lower() for k, a in zip(KEYS, got)) for name, got in said.items()}
        figures[kind]["general_mc"] = general_knowledge(path)
        figures[kind]["answers"] = said
        print(kind, {k: v for k, v in figures[kind].items() if k != "answers"}, flush=True)
    for into, report in reports.items():
        q = report["verification"]["logits"]["vs_quantized"][into]
        figures[into]["vs_4bit"] = {"mean_kl": q["mean_kl"], "next_token_agreement": q["next_token_agreement"]}
    print(f"\n{'model':<18}{'taught /8':>10}{'paraphr. /8':>12}{'general_mc':>11}{'KL to 4-bit':>13}{'agreement':>11}")
    for kind, f in figures.items():
        q = f.get("vs_4bit", {})
        print(f"{kind:<18}{f['taught']:>10}{f['paraphrases']:>12}{f['general_mc']:>11.3f}"
              f"{q.get('mean_kl', float('nan')):>13.4f}{q.get('next_token_agreement', float('nan')):>11.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
