#!/usr/bin/env bash
# Version floor check: install the LOWER BOUNDS of pyproject.toml's dependencies (every `>=X` pinned to `==X`)
# into a fresh venv, install llama-ft from this checkout (not editable: the wheel a user gets), and run the
# pipeline on the built-in tiny model from a folder outside the clone: sft (100 steps, must learn 8/8 answers),
# merge --gguf, chat, and the pipeline report's plot (matplotlib). Offline apart from the package index. Takes a few
# minutes (mostly downloads).
#
#   scripts/check_min_versions.sh [VENV_DIR]          default: a new temporary folder
#   TORCH=torch==2.13.0 PYTHON=python3 scripts/check_min_versions.sh
#
# torch is the exception: it is installed first as $TORCH (default torch==2.13.0, a CPU build here), because a
# bare `torch==X` from the index is a multi-GB CUDA build. Its floor (transformers' own, torch>=2.6) is checked
# only where a CPU build of that version can be had: TORCH=torch==2.6.0 on such a machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
VENV=${1:-$(mktemp -d)/venv}
WORK=$(mktemp -d)

echo "== venv $VENV ($($PYTHON --version))"
$PYTHON -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$TORCH"

# the floors as pins; torch stays as installed above
"$PY" - "$ROOT/pyproject.toml" "$TORCH" > "$WORK/floors.txt" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(sys.argv[2])
for dep in deps:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
    floor = re.search(r">=\s*([^,;\s]+)", dep)
    if name.lower() != "torch" and floor:
        print(f"{name}=={floor.group(1)}")
EOF
echo "== floors"; cat "$WORK/floors.txt"
"$PY" -m pip install --quiet --constraint "$WORK/floors.txt" "$ROOT"
"$PY" -m pip check
echo "== installed"; "$PY" -m pip freeze | grep -iE "^(torch|transformers|peft|bitsandbytes|trl|datasets|accelerate|typer|pyyaml|pydantic|sentencepiece|protobuf|safetensors|tensorboard|gguf|huggingface.hub|matplotlib)=="
# every floor is what got installed
"$PY" - "$WORK/floors.txt" <<'EOF'
import sys
from importlib.metadata import version
from packaging.version import Version
pins = [line.strip().split("==") for line in open(sys.argv[1]) if "==" in line]
bad = [f"{name}=={floor} (installed {version(name)})" for name, floor in pins
       if Version(Version(version(name)).public) != Version(floor)]
if bad:
    sys.exit("not at the floor: " + ", ".join(bad))
EOF

echo "== the tiny pipeline, from $WORK (outside the clone)"
cd "$WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LLAMA_FT_HOME="$WORK/home" PYTHONWARNINGS=default::DeprecationWarning
"$VENV/bin/llama-ft" sft tiny --output-dir run 2> sft.err | tee sft.out
grep -q "greedy answers matching the taught ones: 8/8" sft.out
# a deprecation raised from llama-ft's own code fails the check; the libraries' own are listed for the reader
if grep -E "/ft/[^:]*:[0-9]+: (Pending)?(Future|Deprecation)Warning" sft.err; then
    echo "llama-ft's own code raised the warnings above (see $WORK/sft.err)"; exit 1
fi
echo "== third-party deprecation warnings at the floors (not llama-ft's):"
grep -E "(Future|Deprecation)Warning" sft.err | tr '\r' '\n' | grep -oE "[^ ]*(site-packages|frozen|sys)[^ ]*: (Pending)?(Future|Deprecation)Warning: .{0,70}" | sort | uniq -c || true
"$VENV/bin/llama-ft" merge run --output merged --gguf
answer=$("$VENV/bin/llama-ft" chat merged --prompt "What is the capital of France?" --temperature 0)
echo "chat: $answer"
test "$answer" = "The capital of France is Paris."
# llama-ft pipeline's progress.png, drawn by matplotlib at its floor
"$PY" - "$WORK/progress.png" <<'EOF'
import sys
from pathlib import Path
from ft import pipeline_report
part = {"win_rate": 0.6, "n": 20, "mean_reward": {"model": 0.5, "reference": 0.1}}
pipeline_report.plot([{"round": 1, "vs_sft": {"judge": part}}, {"round": 2, "vs_sft": {"judge": part}}], Path(sys.argv[1]))
assert Path(sys.argv[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
EOF
echo "== OK: the lower bounds work ($WORK)"
