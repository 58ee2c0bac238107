"""The one answer to "is this name a Hub repository or a local path?", for every module (models, data, plan, push),
and the one lookup of a Hub repository's file in the local cache (`hub_cache_file`: plan, push).

A leaf: it imports nothing from ft, so the modules that load models and data need not import the push client.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # OWNER/NAME
# a name ending in one of these is a file (data, weights, a recipe), never a Hub repository
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".yaml", ".yml", ".safetensors", ".bin", ".gguf", ".py")


def is_hub_id(name: str) -> bool:
    """Whether `name` (a model, dataset or adapter) means a Hub repository OWNER/NAME rather than a local path: one
    slash, no leading `.`, `/` or `~`, no file suffix, and nothing of that name in the current directory."""
    return (bool(REPO_ID.match(name)) and not name.lower().endswith(FILE_SUFFIXES)
            and not Path(name).expanduser().exists())


def hub_cache_file(repo_id: str, filename: str) -> Path | None:
    """A file of a Hub model repo if the local Hugging Face cache holds it at the `main` ref (what `hf download`
    records), found by huggingface_hub's own lookup; None if it does not, or `repo_id` is not a valid Hub id.
    Never downloads."""
    from huggingface_hub import try_to_load_from_cache  # ~0.3 s of imports: only when a Hub id is looked up
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except HFValidationError:
        return None
    return Path(cached) if isinstance(cached, str) else None  # not a str: absent, or cached as absent
