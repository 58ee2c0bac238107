"""Peak memory of `llama-ft merge` against the size of the model it merges.

Builds a random Llama-architecture checkpoint of --layers x --hidden in float16, saved in shards
of --shard-mb, gives it a LoRA adapter on every projection (random, non-zero), then runs the merge
in a fresh process and reports its peak RSS growth next to the model size and the shard size.
For comparison it also reports the plain PEFT path (load the whole base, merge_and_unload,
save_pretrained) in another fresh process.

With --llama2-7b it writes a random checkpoint with Llama-2-7B's exact shapes (float16, 13.5 GB,
tensor by tensor, no model object) plus an r=16 adapter on every projection, and measures
`llama-ft merge` on it (the plain path is not run there: it needs the whole model in memory).

Run:  python benchmarks/merge_memory.py [--layers 16 --hidden 1024 --shard-mb 100]
      python benchmarks/merge_memory.py --llama2-7b --workdir /big/disk   (needs ~30 GB of disk)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

MERGE = """
import json, sys
from ft import merge
report = merge.merge(sys.argv[1], sys.argv[2], dtype="float16", verify_logits=False, log=lambda *a: None,
                     max_shard_bytes=int(sys.argv[3]) << 20)
print(json.dumps({"before": report["memory"]["rss_before_bytes"], "peak": report["memory"]["peak_rss_streaming_bytes"]}))
"""

PLAIN = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from ft import memory_use
memory_use.reset_peak()
before = memory_use.current_rss()
model = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float16)
model = PeftModel.from_pretrained(model, sys.argv[1]).merge_and_unload()
model.save_pretrained(sys.argv[2])
print(json.dumps({"before": before, "peak": memory_use.peak_rss()}))
"""


def build(folder: Path, layers: int, hidden: int, shard_mb: int) -> tuple[Path, Path]:
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ft import models, tiny
    from ft.recipe import LoraSection

    vocab = json.loads((tiny.path() / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)
    torch.manual_seed(0)
    base = folder / "base"
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(base, max_shard_size=f"{shard_mb}MB")
    for f in tiny.path().glob("tokenizer*"):
        (base / f.name).write_bytes(f.read_bytes())
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), models.lora_config(LoraSection()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    run = folder / "run"
    model.save_pretrained(run)
    models.load_tokenizer(str(base)).save_pretrained(run)
    recipe = {"model": {"name": str(base), "quantization": "none"}, "data": {"train": "x.jsonl"}, "output_dir": str(run)}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return base, run


LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
PROJECTIONS = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
               "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
               "mlp.down_proj": (4096, 11008)}


def build_llama2_7b(folder: Path, shard_mb: int) -> tuple[Path, Path]:
    """Random float16 weights with Llama-2-7B's names and shapes, written shard by shard; an r=16 adapter."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from ft import models, tiny

    base, run = folder / "base", folder / "run"
    base.mkdir()
    run.mkdir()
    LlamaConfig(**LLAMA2_7B).save_pretrained(base)
    shapes = {"model.embed_tokens.weight": (32000, 4096)}
    for i in range(32):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (4096,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (4096,)
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in PROJECTIONS.items()})
    shapes.update({"model.norm.weight": (4096,), "lm_head.weight": (32000, 4096)})
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, files = {}, {}, 0, []

    def write() -> None:
        nonlocal shard, size
        files.append(f"shard-{len(files) + 1:03d}.safetensors")
        save_file(shard, str(base / files[-1]), metadata={"format": "pt"})
        weight_map.update({k: files[-1] for k in shard})
        shard, size = {}, 0

    for key, shape in shapes.items():
        shard[key] = (torch.randn(shape, generator=generator) * 0.02).half()
        size += shard[key].numel() * 2
        if size >= shard_mb * 2**20:
            write()
    if shard:
        write()
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    lora = {}
    for i in range(32):
        for name, (out_features, in_features) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(16, in_features, generator=generator) * 0.01
            lora[f"{prefix}.lora_B.weight"] = torch.randn(out_features, 16, generator=generator) * 0.01
    save_file(lora, str(run / "adapter_model.safetensors"))
    (run / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": [n.split(".")[-1] for n in PROJECTIONS], "base_model_name_or_path": str(base)}))
    models.load_tokenizer(tiny.NAME).save_pretrained(run)  # merge only copies the run's tokenizer
    recipe = {"model": {"name": str(base), "quantization": "4bit"}, "data": {"train": "x.jsonl"}, "output_dir": str(run)}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return base, run


LLAMA2_7B_MERGE = """
import json, sys, time
from ft import memory_use, merge
started = time.perf_counter()
report = merge.merge(sys.argv[1], sys.argv[2], dtype="float16")
print(json.dumps({"before": report["memory"]["rss_before_bytes"], "peak": report["memory"]["peak_rss_streaming_bytes"],
                  "peak_with_checks": memory_use.peak_rss(), "seconds": time.perf_counter() - started,
                  "verification": report["verification"]}))
"""


def measure(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard-mb", type=int, default=100, help="shard size of the base and of the merged output")
    parser.add_argument("--llama2-7b", action="store_true", help="measure a merge with Llama-2-7B's exact shapes")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the temporary checkpoints")
    args = parser.parse_args()
    mib, gib = 2**20, 2**30
    if args.llama2_7b:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            started = time.perf_counter()
            base, run = build_llama2_7b(Path(tmp), shard_mb=2000)
            size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
            print(f"wrote a random Llama-2-7B checkpoint: {size / gib:.2f} GiB float16 in {time.perf_counter() - started:.0f}s")
            m = measure(LLAMA2_7B_MERGE, run, Path(tmp) / "merged")
        print(f"llama-ft merge: peak RSS {m['peak'] / gib:.2f} GiB while merging (growth {(m['peak'] - m['before']) / gib:.2f} GiB), "
              f"{m['peak_with_checks'] / gib:.2f} GiB including verification; {m['seconds']:.0f}s in all")
        print(f"verification: {json.dumps(m['verification'])}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        base, run = build(Path(tmp), args.layers, args.hidden, args.shard_mb)
        shards = sorted(base.glob("*.safetensors"))
        size, largest = sum(s.stat().st_size for s in shards), max(s.stat().st_size for s in shards)
        ours = measure(MERGE, run, Path(tmp) / "merged", args.shard_mb)
        plain = measure(PLAIN, run, Path(tmp) / "plain", base)
    print(f"model: {args.layers} layers x hidden {args.hidden}, float16, {size / mib:.0f} MiB in {len(shards)} shards "
          f"(largest {largest / mib:.0f} MiB)")
    for name, m in (("llama-ft merge (streamed)", ours), ("plain PEFT merge_and_unload", plain)):
        growth = m["peak"] - m["before"]
        print(f"{name:<28} peak RSS {m['peak'] / mib:6.0f} MiB, growth {growth / mib:6.0f} MiB "
              f"= {growth / size:.2f} x model size")


if __name__ == "__main__":
    main()
