"""Run llama-ft from a clone without installing the console script: `python cli.py sft recipes/tiny.yaml`."""
from ft.cli import main

main()
