"""Memory of PPO's models: llama-ft's one 4-bit base with adapters vs four separate 4-bit models.

PPO needs a policy, a reference, a value model and a reward model. llama-ft keeps one 4-bit copy of the base
and gives each its LoRA adapter (plus a scalar head for value and reward); the plain library path before
llama-ft (TRL's former PPOTrainer in PEFT mode, and most PPO scripts) loads the value and reward models, and
often the reference, as models of their own. Each configuration runs in its own process on a randomly
initialised Llama-architecture model and reports the growth of its resident memory (CPU) or
torch.cuda.max_memory_allocated (GPU).

    python benchmarks/ppo_memory.py                 # hidden 1024, 8 layers, vocab 32000 (~0.2 B parameters)
    python benchmarks/ppo_memory.py --layers 32 --hidden 4096 --intermediate 11008   # Llama-2-7B's shapes (a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(folder: Path, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ft import tiny

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128, max_position_embeddings=4096, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    # the tiny tokenizer is enough: nothing is tokenized here
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (tiny.path() / name).exists():
            (folder / name).write_bytes((tiny.path() / name).read_bytes())


def measure(kind: str, folder: str) -> dict:
    import gc

    import bitsandbytes  # noqa: F401  (imported before the first reading: libraries are not what is measured)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from ft import memory_use, models
    from ft.recipe import LoraSection, ModelSection

    on_gpu = torch.cuda.is_available()
    memory_use.release()
    start = memory_use.current_rss()
    section = ModelSection(name=folder)
    lora = LoraSection()
    if kind == "shared":
        policy = models.attach_lora(models.load_model(section), lora, gradient_checkpointing=False)
        models.add_adapter(policy, "reference", copy_of="default")
        models.add_adapter(policy, "value", lora=lora, trainable=True)
        models.add_adapter(policy, "rm_helpfulness", lora=lora)
        heads = [torch.nn.Linear(policy.config.hidden_size, 1) for _ in range(2)]
        held = [policy, heads]
    else:
        policy = models.attach_lora(models.load_model(section), lora, gradient_checkpointing=False)
        reference = models.attach_lora(models.load_model(section), lora, gradient_checkpointing=False)
        value = models.attach_lora(models.load_model(section, reward=True), lora, gradient_checkpointing=False, reward=True)
        rm = models.attach_lora(models.load_model(section, reward=True), lora, gradient_checkpointing=False, reward=True)
        held = [policy, reference, value, rm]
    gc.collect()
    memory_use.release()
    if on_gpu:
        return {"kind": kind, "held": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated(),
                "measure": "torch.cuda memory_allocated / max_memory_allocated", "models": len(held)}
    return {"kind": kind, "held": memory_use.current_rss() - start, "peak": memory_use.peak_rss() - start,
            "measure": "growth of the process's resident memory (held after loading / peak while loading)",
            "models": len(held)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args)
        results = []
        for kind in ("shared", "separate"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, tmp], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    shared, separate = results
    print(f"model: hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, vocab 32000; 4-bit NF4; LoRA r 16 "
          f"on every projection; memory: {shared['measure']}")
    print(f"  {'':<76} {'held':>8} {'peak':>8}")
    for r in results:
        label = ("llama-ft: one 4-bit base, adapters policy/reference/value/reward + 2 heads" if r["kind"] == "shared"
                 else "four separate 4-bit models (policy, reference, value, reward), a LoRA each")
        print(f"  {label:<76} {r['held'] / 2**20:5.0f} MiB {r['peak'] / 2**20:5.0f} MiB")
    print(f"  separate / shared, held: {separate['held'] / shared['held']:.2f}x")


if __name__ == "__main__":
    main()
