"""llama-ft: fine-tune Llama 2 with QLoRA on one small GPU."""

__version__ = "0.1.0"


def run_stage(*args, **kwargs):
    """Run a training stage from Python as `llama-ft STAGE RECIPE` does: see ft.stages.run_stage."""
    from ft.stages import run_stage as run

    return run(*args, **kwargs)
