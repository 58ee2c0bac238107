"""Which `Shape` a recipe's model has: Llama 2's published shapes (and those of the other models a shipped recipe
names) built in, else the model's config.json from a local folder or the local Hugging Face cache. Never downloads."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ft import tiny
from ft.errors import UserError
from ft.hub_id import hub_cache_file, is_hub_id
from ft.plan.memory import Shape

# Llama 2's published shapes (the paper, Table 1, and Meta's params.json).
LLAMA2 = {
    "7b": Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
    "13b": Shape(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
    "70b": Shape(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=32000),
}
# The other checkpoints a shipped recipe names, from their published config.json (recipes/smol.yaml).
BUILT_IN = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": Shape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536,
                                                 vocab=49152, tie_embeddings=True, head_dim=64),
}
_LLAMA2_ID = re.compile(r"(?:meta-llama/)?llama-2-(7|13|70)b(?:-chat)?(?:-hf)?", re.IGNORECASE)


def shape_from_config(config: dict, where: str) -> Shape:
    """The Shape of a transformers Llama-style config.json (as a dict); `where` names it in errors."""
    try:
        heads = int(config["num_attention_heads"])
        return Shape(hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
                     kv_heads=int(config.get("num_key_value_heads") or heads),
                     intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                     tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                     head_dim=config.get("head_dim"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: not a Llama-style config (missing or bad {e})") from None


def model_shape(name: str) -> tuple[Shape, str]:
    """The model's shape and where it came from: a built-in Llama 2 config, a local config.json, the Hub cache.

    Never downloads: a Hub id whose config.json is not cached is a user error that says how to get it.
    """
    match = _LLAMA2_ID.fullmatch(name.strip())
    if match:
        return LLAMA2[match.group(1) + "b"], f"built-in Llama-2-{match.group(1)}b config"
    if name in BUILT_IN:
        return BUILT_IN[name], f"built-in {name.split('/')[1]} config"
    if name == tiny.NAME:
        cached = tiny.cache_dir() / f"tiny-llama-2-v{tiny.VERSION}" / "config.json"
        if cached.is_file():
            return shape_from_config(json.loads(cached.read_text()), str(cached)), "built-in tiny model config"
        c = tiny.CONFIG
        return Shape(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                     kv_heads=c["num_key_value_heads"], intermediate=c["intermediate_size"], vocab=1024), \
            "built-in tiny model config"
    local = Path(name).expanduser()
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            raise UserError(f"model.name {name!r}: the folder has no config.json")
        return shape_from_config(_read_json(config), str(config)), f"{config}"
    if not is_hub_id(name):
        raise UserError(f"model.name {name!r}: no such folder, and not a Hub id of the form owner/name")
    cached = hub_cache_file(name, "config.json")
    if cached is None:
        raise UserError(f"model.name {name!r}: its config.json is not in the local Hugging Face cache, and plan never "
                        f"downloads. Fetch just that file (a few KB) with `hf download {name} config.json`, or point "
                        "model.name at a local folder holding config.json (built in: meta-llama/Llama-2-7b/13b/70b, HuggingFaceTB/SmolLM2-135M-Instruct)")
    return shape_from_config(_read_json(cached), str(cached)), "config.json from the Hub cache"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from None
