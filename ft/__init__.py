"""llama-ft: fine-tune Llama 2 with QLoRA on one small GPU."""

import os

__version__ = "0.1.0"

# No compiled code from the Hub: bitsandbytes (0.50, on a CPU with AVX512-BF16) asks the Hub at import time for a
# faster 4-bit kernel through the `kernels` package (a transformers dependency since 5.2x), which would download a
# binary and load it into this process: remote code, and a network call from every command, offline ones included.
# Pointing that one repository at a local folder that does not exist makes the lookup fail at once, without the
# network; bitsandbytes then uses its built-in kernel (what it did before `kernels` was installed). A user's own
# LOCAL_KERNELS is kept.
os.environ.setdefault("LOCAL_KERNELS", "kernels-community/quantization-bitsandbytes=/nonexistent/llama-ft-uses-no-hub-kernels")


def run_stage(*args, **kwargs):
    """Run a training stage from Python as `llama-ft STAGE RECIPE` does: see ft.runner.run_stage."""
    # imported when called: `import ft` (and `python -m ft --help`) stays light. The one function-level import that
    # closes a circle (ft.runner imports ft's modules); tests/test_layout.py allows exactly these public re-exports.
    from ft.runner import run_stage as run

    return run(*args, **kwargs)


def run_pipeline(*args, **kwargs):
    """Run the Llama 2-Chat pipeline from Python as `llama-ft pipeline RECIPE` does: see ft.pipeline.run_pipeline."""
    # imported when called, as run_stage (tests/test_layout.py allows this re-export too)
    from ft.pipeline import run_pipeline as run

    return run(*args, **kwargs)
