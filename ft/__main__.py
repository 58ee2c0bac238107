"""`python -m ft` is the llama-ft command line."""
from ft.cli import main

main()
