#!/usr/bin/env bash
# Regenerate docs/images/chat-web.png and docs/images/annotate.png: the browser tests of tests/test_web.py, which
# save a screenshot of each page when LLAMA_FT_SCREENSHOTS names a folder.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_FT_SCREENSHOTS="$PWD/docs/images" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest -q -p no:xdist \
    tests/test_web.py -k "chat_page or annotate_page"
