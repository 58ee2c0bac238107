"""`llama-ft merge`: fold a run's LoRA adapter into float base weights, with bounded memory.

Two merges (`into`):
  * as-trained: into the de-quantised 4-bit weights the adapter was trained on, dequantise(NF4(W)) + s * B @ A,
    with exactly bitsandbytes' quantisation as models.load_model applies it (transformers' own choice of the
    quantised modules and their settings: NF4, double quantisation, blocksize 64, the run's compute dtype). Every
    4-bit weight is replaced by its de-quantised value, adapted or not, so the merged float model computes what
    the 4-bit model + adapter computed in training and evaluation, up to rounding.
  * original: into the unquantised weights, W + s * B @ A: the adapter learned to correct the quantised W, and
    here meets the original W instead.
The result is always a float model (never re-quantised to 4-bit). The report measures both merges against the
4-bit model as trained (mean KL, greedy next-token agreement), whichever is written; docs/commands.md#merge has
the figures the default was chosen from. A run trained without quantisation has one merge: both are the same.

The base checkpoint is streamed shard by shard (safetensors): each tensor is read, merged (float32 maths) and
stored in the output dtype; each output shard is written and released before the next is read. Peak memory stays
near one shard plus the adapter, so Llama-2-7B merges within Colab's 12.7 GB of RAM.

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
INTO = ("as-trained", "original")
DEFAULT_INTO = "as-trained"  # keeps what was trained: docs/measurements.md, the merge of a real model both ways
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


def merge(run_dir: str | Path, output: str | Path, *, into: str = DEFAULT_INTO, dtype: str = "float16",
          base: str | None = None, force: bool = False, verify_logits: bool = True,
          gguf_types: list[str] | None = None, max_shard_bytes: int = 1 << 30, log=print) -> dict:
    """Merge the run's adapter into `base` (default: the run's), `into` its de-quantised 4-bit weights
    ("as-trained") or its unquantised ones ("original"), and write the result to `output`, verified; returns the
    report written as merge_report.json. Nothing is at `output` unless every step succeeded."""
    import torch
    from safetensors.torch import load_file

    if into not in INTO:
        raise UserError(f"--into {into}: expected one of {', '.join(INTO)}")
    run_dir, target = Path(run_dir), Path(output).expanduser()
    recipe = _check_inputs(run_dir, target, force)
    base_name = base or recipe.model.name
    base_dir = models.local_checkpoint(base_name)
    if gguf_types:  # what GGUF export would refuse, it refuses now, before the merge
        from ft import export_gguf

        export_gguf.check(run_dir, base_dir)
    base_map = _base_tensors(base_dir, base_name)
    r, alpha, scale = _lora_scale(run_dir)
    lora = _lora_pairs(load_file(str(run_dir / runs.ADAPTER_WEIGHTS)))
    four_bit = _as_trained_weights(into, recipe, base_dir, run_dir, log)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = runs.make_temp_dir(target)
    try:
        # 1. stream: one base tensor at a time in, output shards of at most max_shard_bytes out
        memory_use.reset_peak()
        rss_before = memory_use.current_rss()
        started = time.perf_counter()
        out_map, written, total_size, touched = _stream_merged(base_map, lora, scale, four_bit, getattr(torch, dtype),
                                                               tmp, max_shard_bytes, run_dir, base_name)
        peak_streaming = memory_use.peak_rss()
        seconds = time.perf_counter() - started
        out_map = _name_shards(tmp, written, out_map, total_size)
        tokenizer = _write_beside_weights(base_dir, run_dir, recipe, tmp, dtype)
        log(f"merged {len(touched)} LoRA-adapted weights into the "
            f"{'de-quantised 4-bit' if four_bit else 'unquantised'} base weights"
            f"{f' ({len(four_bit)} weights de-quantised)' if four_bit else ''}, wrote {len(written)} shard(s) in {seconds:.1f}s; "
            f"peak memory {peak_streaming / 2**20:.0f} MiB (base {sum(p.stat().st_size for p in set(base_map.values())) / 2**20:.0f} MiB)")
        report = {
            "run_dir": str(run_dir.resolve()),
            "base": base_name,
            "into": into,
            "trained_quantization": recipe.model.quantization,
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
            report["verification"] = _verify_all(tmp, out_map, base_map, lora, scale, four_bit, dtype, total_size,
                                                 run_dir, recipe, base_name, tokenizer, target, log)
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


def _as_trained_weights(into: str, recipe, base_dir: Path, run_dir: Path, log) -> dict:
    """{module: its 4-bit settings} of the weights an as-trained merge de-quantises ({} for an original merge, or
    for a run that trained on unquantised weights, where both merges are the same)."""
    if into == "original" or recipe.model.quantization == "none":
        if into == "as-trained":
            log(f"{run_dir} trained on unquantised weights: merging into them (as trained and original are the same)")
        return {}
    if recipe.model.quantization != "4bit":
        raise UserError(f"{run_dir} trained on {recipe.model.quantization} weights: --into as-trained merges into "
                        "de-quantised 4-bit weights only (8-bit layers compute outliers in float16, so there is "
                        "no one de-quantised weight); use --into original")
    return four_bit_settings(base_dir, recipe.model)


def four_bit_settings(base_dir: Path, model) -> dict:
    """{module: bitsandbytes' Params4bit settings} of every weight models.load_model quantises to 4-bit for the
    recipe's `model:` section: transformers' own choice (its bitsandbytes quantizer applied to an empty model of
    the base's config: all Linear layers but the head), without loading any weight."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=model.trust_remote_code)
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config, dtype=models.compute_dtype(model.dtype),
                                                 trust_remote_code=model.trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(models.quantization_config(model), pre_quantized=False)
    quantizer.preprocess_model(empty, device_map={"": "cpu"})
    return {name: {"dtype": models.compute_dtype(model.dtype),
                   **{k: v for k, v in module.weight.__dict__.items() if k != "module"}}  # not the empty layer
            for name, module in empty.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def dequantised(weight, settings: dict):
    """dequantise(NF4(W)): the weight a 4-bit layer computes with, quantised as transformers quantises it when
    models.load_model loads the base (W in the compute dtype, bitsandbytes' Params4bit), in float32."""
    import bitsandbytes as bnb

    settings = dict(settings)
    dtype = settings.pop("dtype")
    packed = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, **settings).to("cpu")
    return bnb.functional.dequantize_4bit(packed.data, packed.quant_state).float()


def _stream_merged(base_map: dict, lora: dict, scale: float, four_bit: dict, out_dtype, tmp: Path,
                   max_shard_bytes: int, run_dir: Path, base_name: str) -> tuple[dict, list[str], int, set]:
    """Write W + scale * B @ A (float32 maths, `out_dtype` storage; W de-quantised where `four_bit` names it) for
    every base tensor into part-N shards in `tmp`, one tensor in memory at a time; returns ({tensor: part file},
    part files, total bytes, merged modules)."""
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
        if module in four_bit and key.endswith(".weight"):
            tensor = dequantised(tensor, four_bit[module])
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


def _verify_all(tmp: Path, out_map: dict, base_map: dict, lora: dict, scale: float, four_bit: dict, dtype: str,
                total_size: int, run_dir: Path, recipe, base_name: str, tokenizer, target: Path, log) -> dict:
    """Every merged weight against PEFT's forward on the weights merged into, then (when a float32 copy fits in RAM)
    the logits on chat prompts; raises VerificationError if either disagrees."""
    import torch

    v = {"tensors": tensor_check(tmp, out_map, base_map, lora, scale, dtype, four_bit)}
    t = v["tensors"]
    log(f"verified {t['modules']} merged weights against PEFT's forward pass on the "
        f"{'de-quantised 4-bit' if four_bit else 'unquantised'} base: max relative error "
        f"{t['max_rel_error']:.1e} (tolerance {t['tolerance']:.0e})")
    fp32_bytes = total_size * 4 // torch.empty((), dtype=getattr(torch, dtype)).element_size()
    if fp32_bytes < 0.4 * _physical_memory():
        v["logits"] = verify(tmp, run_dir, recipe, base_name, dtype, tokenizer, four_bit)
        lg = v["logits"]
        log(f"verified logits on {lg['probes']} chat prompts against {lg['reference']}: max |Δlogit| "
            f"{lg['max_abs_diff']:.2e}, mean KL {lg['mean_kl']:.2e} (tolerance {lg['kl_tolerance']:.0e})")
        if "vs_quantized" in lg:
            q = lg["vs_quantized"]
            log(f"  distance to the {q['quantization']} model the adapter was trained on (mean KL, greedy next-token "
                "agreement): " + "; ".join(
                    f"{into}{' (written)' if into == q['merged'] else ''} {q[into]['mean_kl']:.2e}, "
                    f"{q[into]['next_token_agreement']:.0%}" for into in INTO if into in q))
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


def verify(merged_dir: Path, run_dir: Path, recipe, base_name: str, dtype: str, tokenizer, four_bit: dict) -> dict:
    """Logits of the merged model against what was merged (both float32 on the CPU) on chat-formatted probes: the
    float base + adapter (PEFT's forward), with every 4-bit weight de-quantised for an as-trained merge.

    Also measures, without gating on it, the distance of both merges to the quantised model the adapter was trained
    and evaluated with (the written merge from its files, the other from the float base in memory).
    """
    import torch

    from ft.recipe import ModelSection

    inputs = [tokenizer.apply_chat_template(p, return_tensors="pt", return_dict=True)["input_ids"] for p in PROBES]

    def logits_of(model) -> list:
        model.eval()
        with torch.no_grad():
            return [model(input_ids=ids.to(model.device)).logits[0].float().cpu() for ids in inputs]

    merged = logits_of(models.load_model(ModelSection(name=str(merged_dir), quantization="none", dtype="float32")))
    unmerged = models.load_adapter(models.load_model(ModelSection(name=base_name, quantization="none", dtype="float32")),
                                   run_dir)
    variants = {"original": logits_of(unmerged)}
    if recipe.model.quantization == "4bit":  # the same float model with its 4-bit weights de-quantised
        settings = four_bit or four_bit_settings(models.local_checkpoint(base_name), recipe.model)
        inner = unmerged.get_base_model()
        with torch.no_grad():
            for name, module_settings in settings.items():
                layer = inner.get_submodule(name)
                layer = getattr(layer, "base_layer", layer)  # a LoRA-wrapped Linear
                layer.weight.copy_(dequantised(layer.weight, module_settings))
        variants["as-trained"] = logits_of(unmerged)
    del unmerged
    memory_use.release()
    into = "as-trained" if four_bit else "original"
    result = _compare(variants[into], merged)
    result.update(probes=len(PROBES), kl_tolerance=KL_TOLERANCE[dtype],
                  reference="de-quantised 4-bit base + adapter" if four_bit else "base + adapter")
    result["passed"] = result["mean_kl"] <= KL_TOLERANCE[dtype]
    if recipe.model.quantization != "none":
        trained = ModelSection(name=base_name, quantization=recipe.model.quantization, dtype=recipe.model.dtype)
        as_trained = models.load_adapter(models.load_model(trained), run_dir)
        models.exact_4bit_kernels(as_trained)  # the forward training ran, not the CPU's inference-only repacking
        quantized = logits_of(as_trained)
        variants[into] = merged
        result["vs_quantized"] = {"quantization": recipe.model.quantization, "merged": into,
                                  **{name: _compare(quantized, logits) for name, logits in variants.items()}}
    return result


def tensor_check(merged_dir: Path, merged_map: dict, base_map: dict, lora: dict, scale: float, dtype: str,
                 four_bit: dict | None = None) -> dict:
    """Every merged weight against PEFT's LoRA forward on random inputs, one weight at a time: x @ W.T + s * B(A(x))
    with W the base weight, de-quantised where `four_bit` names it (and, there, x @ W.T alone for a weight no
    adapter touches)."""
    import torch
    from safetensors import safe_open

    four_bit = four_bit or {}
    generator = torch.Generator().manual_seed(0)
    worst, modules = 0.0, 0
    for module in sorted(set(lora) | set(four_bit)):
        key = module + ".weight"
        if key not in merged_map:
            continue
        with safe_open(str(base_map[key]), "pt") as f:
            weight = f.get_tensor(key).float()
        if module in four_bit:
            weight = dequantised(weight, four_bit[module])
        with safe_open(str(merged_dir / merged_map[key]), "pt") as f:
            merged = f.get_tensor(key).float()
        x = torch.randn(8, weight.shape[1], generator=generator)
        expected = x @ weight.T
        if module in lora:
            a, b = (t.float() for t in lora[module])
            expected = expected + scale * ((x @ a.T) @ b.T)
        got = x @ merged.T
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item())
        modules += 1
    return {"modules": modules, "max_rel_error": worst, "tolerance": TENSOR_TOLERANCE[dtype],
            "passed": modules == len(set(lora) | set(four_bit)) and worst <= TENSOR_TOLERANCE[dtype]}


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

