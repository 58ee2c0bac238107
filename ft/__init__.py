"""llama-ft: fine-tune Llama 2 with QLoRA on one small GPU."""

__version__ = "0.1.0"
