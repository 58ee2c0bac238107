"""`llama-ft merge`: fold a run's LoRA adapter into the unquantised base weights, with bounded memory.

The base checkpoint is streamed shard by shard (safetensors): each tensor a LoRA pair touches
becomes W + (alpha/r) * B @ A, computed in float32 and stored in the output dtype; each output
shard is written and released before the next is read. Peak memory stays near one shard plus
the adapter, so Llama-2-7B merges within Colab's 12.7 GB of RAM. The adapter is never merged into
4-bit weights: those are a lossy copy, and a merge into them bakes the quantisation error in.

Everything is written into a temporary folder beside the target and renamed on success; then
the result is verified (see `verify`) before the rename, so a failed or interrupted merge never
leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ft import memory_use, models, runs
from ft.errors import UserError

REPORT_FILE = "merge_report.json"
PROBES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write one sentence about llamas."}],
]
# Mean KL(base+adapter || merged) per token allowed, by output dtype (rounding of the merged weights)
KL_TOLERANCE = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}
# Largest relative error of x @ W_merged.T against PEFT's forward x @ W.T + s * B(A(x)), by output dtype
TENSOR_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


class VerificationError(Exception):
    """The merged weights do not reproduce base + adapter: nothing is left at the target."""


def merge(run_dir: str | Path, output: str | Path, *, dtype: str = "float16", base: str | None = None,
          force: bool = False, verify_logits: bool = True, gguf_types: list[str] | None = None,
          max_shard_bytes: int = 1 << 30, log=print) -> dict:
    """Merge the run's adapter into `base` (default: the run's) and write the result to `output`, verified; returns
    the report written as merge_report.json. Nothing is at `output` unless every step succeeded."""
    import torch
    from safetensors.torch import load_file

    run_dir, target = Path(run_dir), Path(output).expanduser()
    recipe = _check_inputs(run_dir, target, force)
    base_name = base or recipe.model.name
    base_dir = models.local_checkpoint(base_name)
    base_map = _base_tensors(base_dir, base_name)
    r, alpha, scale = _lora_scale(run_dir)
    lora = _lora_pairs(load_file(str(run_dir / runs.ADAPTER_WEIGHTS)))

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = runs.make_temp_dir(target)
    try:
        # 1. stream: one base tensor at a time in, output shards of at most max_shard_bytes out
        memory_use.reset_peak()
        rss_before = memory_use.current_rss()
        started = time.perf_counter()
        out_map, written, total_size, touched = _stream_merged(base_map, lora, scale, getattr(torch, dtype), tmp,
                                                               max_shard_bytes, run_dir, base_name)
        peak_streaming = memory_use.peak_rss()
        seconds = time.perf_counter() - started
        out_map = _name_shards(tmp, written, out_map, total_size)
        tokenizer = _write_beside_weights(base_dir, run_dir, recipe, tmp, dtype)
        log(f"merged {len(touched)} LoRA-adapted weights, wrote {len(written)} shard(s) in {seconds:.1f}s; "
            f"peak memory {peak_streaming / 2**20:.0f} MiB (base {sum(p.stat().st_size for p in set(base_map.values())) / 2**20:.0f} MiB)")
        report = {
            "run_dir": str(run_dir.resolve()),
            "base": base_name,
            "dtype": dtype,
            "lora": {"r": r, "alpha": alpha, "scale": scale, "modules_merged": len(touched)},
            "run_metrics": {k: v for k, v in runs.read_json(run_dir / runs.METRICS_FILE).items()
                            if k not in ("samples", "data", "loss_history", "losses")},
            "shards": len(written),
            "total_size_bytes": total_size,
            "seconds": round(seconds, 3),
            "memory": {"rss_before_bytes": rss_before, "peak_rss_streaming_bytes": peak_streaming,
                       "largest_base_shard_bytes": max(p.stat().st_size for p in set(base_map.values())),
                       "max_output_shard_bytes": max_shard_bytes},
        }
        # 2. verify before anything is published
        if verify_logits:
            report["verification"] = _verify_all(tmp, out_map, base_map, lora, scale, dtype, total_size, run_dir,
                                                 recipe, base_name, tokenizer, target, log)
        else:
            report["verification"] = {"skipped": "--no-verify"}
        if gguf_types:
            from ft import export_gguf

            report["gguf"] = [export_gguf.export(tmp, tmp / f"model-{t}.gguf", t, log=log) for t in gguf_types]
        report["peak_rss_bytes"] = memory_use.peak_rss()
        runs.write_json(tmp / REPORT_FILE, report)
        # 3. publish: rename into place
        runs.publish_dir(tmp, target)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_inputs(run_dir: Path, target: Path, force: bool):
    """The run's recipe, if the run is a finished chat-model run and the target may be written."""
    recipe = runs.read_recipe(run_dir)
    if not runs.is_chat_model(recipe):
        raise UserError(f"{run_dir} is a reward model; merge exports chat models (score with `llama-ft score`)")
    for name in (runs.ADAPTER_CONFIG, runs.ADAPTER_WEIGHTS):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name}; the run did not finish (merge needs the final adapter)")
    if target.exists() and not force:
        raise UserError(f"{target}: already exists; pass --force to replace it")
    return recipe


def _lora_scale(run_dir: Path) -> tuple[int, float, float]:
    """(r, alpha, the scale B @ A is multiplied by) of the run's adapter; refused for adapters merge cannot fold."""
    adapter_config = runs.adapter_config(run_dir)
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if adapter_config.get(unsupported):
            raise UserError(f"{run_dir}: adapters with {unsupported} are not supported by merge")
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return r, alpha, alpha / (r**0.5 if adapter_config.get("use_rslora") else r)


def _stream_merged(base_map: dict, lora: dict, scale: float, out_dtype, tmp: Path, max_shard_bytes: int,
                   run_dir: Path, base_name: str) -> tuple[dict, list[str], int, set]:
    """Write W + scale * B @ A (float32 maths, `out_dtype` storage) for every base tensor into part-N shards in
    `tmp`, one tensor in memory at a time; returns ({tensor: part file}, part files, total bytes, merged modules)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    touched, out_map, pending, pending_bytes, total_size, written = set(), {}, {}, 0, 0, []

    def flush() -> None:
        nonlocal pending, pending_bytes
        name = f"part-{len(written) + 1:05d}.safetensors"
        save_file(pending, str(tmp / name), metadata={"format": "pt"})
        written.append(name)
        out_map.update({key: name for key in pending})
        pending, pending_bytes = {}, 0
        memory_use.release()

    for key, shard in base_map.items():
        with safe_open(str(shard), "pt") as f:  # opened per tensor: no mapping of a whole 10 GB shard stays resident
            tensor = f.get_tensor(key)
        module = key.removesuffix(".weight")
        if module in lora:
            a, b = lora[module]
            if tensor.shape != (b.shape[0], a.shape[1]):
                raise UserError(
                    f"adapter in {run_dir} does not fit base {base_name!r}: {key} is {tuple(tensor.shape)}, "
                    f"the adapter expects {(b.shape[0], a.shape[1])} (trained on another base? use --base)"
                )
            tensor = tensor.float() + scale * (b.float() @ a.float())
            touched.add(module)
        if tensor.is_floating_point():
            tensor = tensor.to(out_dtype)
        pending[key] = tensor.contiguous()
        pending_bytes += tensor.numel() * tensor.element_size()
        total_size += tensor.numel() * tensor.element_size()
        if pending_bytes >= max_shard_bytes:
            flush()
    if pending:
        flush()
    missing = sorted(set(lora) - touched)
    if missing:
        raise UserError(f"adapter in {run_dir} does not fit base {base_name!r}: no base weight for {missing[0]} "
                        f"(and {len(missing) - 1} more); trained on another base? use --base")
    return out_map, written, total_size, touched


def _name_shards(tmp: Path, written: list[str], out_map: dict, total_size: int) -> dict:
    """Name the shards as transformers does (model.safetensors, or model-0000i-of-0000n.safetensors + an index);
    returns {tensor: its file}."""
    names = {w: ("model.safetensors" if len(written) == 1 else f"model-{i:05d}-of-{len(written):05d}.safetensors")
             for i, w in enumerate(written, start=1)}
    for old, new in names.items():
        os.replace(tmp / old, tmp / new)
    out_map = {key: names[part] for key, part in out_map.items()}
    if len(written) > 1:
        index_out = {"metadata": {"total_size": total_size}, "weight_map": out_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index_out, indent=2))
    return out_map


def _write_beside_weights(base_dir: Path, run_dir: Path, recipe, tmp: Path, dtype: str):
    """config.json, generation_config.json, the run's tokenizer (chat template), tokenizer.model and recipe.yaml;
    returns the tokenizer."""
    _write_config(base_dir, tmp, dtype)
    tokenizer = models.load_tokenizer(str(run_dir), trust_remote_code=recipe.model.trust_remote_code)
    tokenizer.save_pretrained(str(tmp))
    if (base_dir / "tokenizer.model").is_file():  # the SentencePiece model, for GGUF export and other tools
        shutil.copy(base_dir / "tokenizer.model", tmp / "tokenizer.model")
    shutil.copy(run_dir / runs.RECIPE_FILE, tmp / runs.RECIPE_FILE)  # how it was trained, for the model card
    return tokenizer


def _verify_all(tmp: Path, out_map: dict, base_map: dict, lora: dict, scale: float, dtype: str, total_size: int,
                run_dir: Path, recipe, base_name: str, tokenizer, target: Path, log) -> dict:
    """Every merged weight against PEFT's forward, then (when a float32 copy fits in RAM) the logits on chat
    prompts; raises VerificationError if either disagrees."""
    import torch

    v = {"tensors": tensor_check(tmp, out_map, base_map, lora, scale, dtype)}
    t = v["tensors"]
    log(f"verified {t['modules']} merged weights against PEFT's forward pass: max relative error "
        f"{t['max_rel_error']:.1e} (tolerance {t['tolerance']:.0e})")
    fp32_bytes = total_size * 4 // torch.empty((), dtype=getattr(torch, dtype)).element_size()
    if fp32_bytes < 0.4 * _physical_memory():
        v["logits"] = verify(tmp, run_dir, recipe, base_name, dtype, tokenizer)
        lg = v["logits"]
        log(f"verified logits on {lg['probes']} chat prompts: max |Δlogit| {lg['max_abs_diff']:.2e}, "
            f"mean KL {lg['mean_kl']:.2e} (tolerance {lg['kl_tolerance']:.0e})")
        if "vs_quantized" in lg:
            q = lg["vs_quantized"]
            log(f"  distance to the {q['quantization']} model the adapter was trained on: mean KL {q['mean_kl']:.2e}, "
                f"greedy next-token agreement {q['next_token_agreement']:.0%}")
    else:
        v["logits"] = {"skipped": f"a float32 copy ({fp32_bytes / 2**30:.1f} GiB) does not fit comfortably in RAM; "
                       "the per-weight check above covers every merged tensor"}
        log(f"logit check skipped: {v['logits']['skipped']}")
    v["passed"] = t["passed"] and v["logits"].get("passed", True)
    if not v["passed"]:
        raise VerificationError(f"merged model disagrees with base + adapter ({json.dumps(v)}); "
                                f"nothing was written to {target}")
    return v


def _base_tensors(base_dir: Path, name: str) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it}, in file order."""
    from safetensors import safe_open

    index_path = base_dir / "model.safetensors.index.json"
    if index_path.is_file():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"base {name!r}: no safetensors weights in {base_dir} (merge streams safetensors shards; "
                        "convert the .bin checkpoint with transformers' save_pretrained first)")
    tensors = {}
    for file in files:
        with safe_open(str(base_dir / file), "pt") as f:
            tensors.update({key: base_dir / file for key in f.keys()})
    return tensors


def _lora_pairs(adapter: dict) -> dict:
    """{base module name: (A, B)} from PEFT's saved keys (base_model.model.<module>.lora_A.weight)."""
    pairs: dict[str, list] = {}
    for key, tensor in adapter.items():
        for i, part in enumerate((".lora_A.weight", ".lora_B.weight")):
            if key.endswith(part):
                module = key.removeprefix("base_model.model.").removesuffix(part)
                pairs.setdefault(module, [None, None])[i] = tensor
    broken = [m for m, (a, b) in pairs.items() if a is None or b is None]
    if broken or not pairs:
        raise UserError(f"adapter_model.safetensors: incomplete LoRA weights ({broken[:1] or 'none found'})")
    return {m: (a, b) for m, (a, b) in pairs.items()}


def _write_config(base_dir: Path, out: Path, dtype: str) -> None:
    config = json.loads((base_dir / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = dtype
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = runs.read_json(base_dir / "generation_config.json")
    generation.update({"bos_token_id": config.get("bos_token_id", 1), "eos_token_id": config.get("eos_token_id", 2)})
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def verify(merged_dir: Path, run_dir: Path, recipe, base_name: str, dtype: str, tokenizer) -> dict:
    """Logits of the merged model vs base + adapter (both float32 on the CPU) on chat-formatted probes.

    Also measures, without gating on it, the distance to the quantised model the adapter was trained
    against (the error that training in 4-bit leaves and merging into float weights reveals).
    """
    import torch

    from ft.recipe import ModelSection

    inputs = [tokenizer.apply_chat_template(p, return_tensors="pt", return_dict=True)["input_ids"] for p in PROBES]

    def logits_of(model) -> list:
        model.eval()
        with torch.no_grad():
            return [model(input_ids=ids.to(model.device)).logits[0].float().cpu() for ids in inputs]

    merged = logits_of(models.load_model(ModelSection(name=str(merged_dir), quantization="none", dtype="float32")))
    base_section = ModelSection(name=base_name, quantization="none", dtype="float32")
    reference = logits_of(models.load_adapter(models.load_model(base_section), run_dir))
    result = _compare(reference, merged)
    result.update(probes=len(PROBES), kl_tolerance=KL_TOLERANCE[dtype])
    result["passed"] = result["mean_kl"] <= KL_TOLERANCE[dtype]
    if recipe.model.quantization != "none":
        trained = ModelSection(name=base_name, quantization=recipe.model.quantization, dtype=recipe.model.dtype)
        quantized = logits_of(models.load_adapter(models.load_model(trained), run_dir))
        result["vs_quantized"] = {"quantization": recipe.model.quantization, **_compare(quantized, merged)}
    return result


def tensor_check(merged_dir: Path, merged_map: dict, base_map: dict, lora: dict, scale: float, dtype: str) -> dict:
    """Every merged weight against PEFT's LoRA forward on random inputs, one weight at a time."""
    import torch
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(0)
    worst, modules = 0.0, 0
    for module, (a, b) in lora.items():
        key = module + ".weight"
        if key not in merged_map:
            continue
        with safe_open(str(base_map[key]), "pt") as f:
            weight = f.get_tensor(key).float()
        with safe_open(str(merged_dir / merged_map[key]), "pt") as f:
            merged = f.get_tensor(key).float()
        a, b = a.float(), b.float()
        x = torch.randn(8, a.shape[1], generator=generator)
        expected = x @ weight.T + scale * ((x @ a.T) @ b.T)
        got = x @ merged.T
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item())
        modules += 1
    return {"modules": modules, "max_rel_error": worst, "tolerance": TENSOR_TOLERANCE[dtype],
            "passed": modules == len(lora) and worst <= TENSOR_TOLERANCE[dtype]}


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _compare(reference: list, other: list) -> dict:
    import torch

    max_abs, kls, agree, total = 0.0, [], 0, 0
    for ref, oth in zip(reference, other):
        max_abs = max(max_abs, (ref - oth).abs().max().item())
        p_log, q_log = torch.log_softmax(ref, -1), torch.log_softmax(oth, -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
        agree += (ref.argmax(-1) == oth.argmax(-1)).sum().item()
        total += ref.shape[0]
    return {"max_abs_diff": max_abs, "mean_kl": torch.cat(kls).mean().item(), "next_token_agreement": agree / total}

