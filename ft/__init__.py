"""llama-ft: fine-tune Llama 2 with QLoRA on one small GPU."""


__version__ = "0.1.0"



def run_stage(*args, **kwargs):
    """Run a training stage from Python as `llama-ft STAGE RECIPE` does: see ft.runner.run_stage."""
    # imported when called: `import ft` (and `python -m ft --help`) stays light. The one function-level import that
    # closes a circle (ft.runner imports ft's modules); tests/test_layout.py allows exactly these public re-exports.
    from ft.runner import run_stage as run

    return run(*args, **kwargs)
