"""The one answer to "is this name a Hub repository or a local path?", for every module (models, data, plan, push).

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
