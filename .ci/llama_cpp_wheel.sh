#!/usr/bin/env bash
# Prints the path of a llama-cpp-python wheel built for this machine, building it first if the cache has none.
#
# llama-cpp-python ships only as a source package (llama.cpp compiled by CMake: 25 minutes once on a shared 2-core machine), so
# CI builds it once per machine into a cache outside the clone and installs the wheel into each fresh .venv. The
# build is CPU-only and small: no GPU back-ends, no multimodal library, no llama.cpp tests, examples, tools or
# server binaries (the Python package's own OpenAI-compatible server, llama_cpp.server, needs none of them).
# The cache is keyed by the version and the CPU's feature flags (the build is -march=native).
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${LLAMA_FT_CI_CACHE:-$HOME/.cache/llama-ft-ci}"
PYTHON="${PYTHON:-python3}"
cpu="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12)"
dir="$CACHE/wheels/$cpu"
wheel="$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    mkdir -p "$dir"
    build="$(mktemp -d "$dir/.build.XXXXXX")"
    trap 'rm -rf "$build"' EXIT
    echo "building llama-cpp-python $VERSION into $dir (once per machine: many minutes on 2 cores)" >&2
    started=$SECONDS
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$PYTHON" -m pip wheel --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$build" >&2
    built="$(ls "$build"/llama_cpp_python-"$VERSION"-*.whl)"
    mv "$built" "$dir/"  # the cache holds a wheel only once it is complete
    wheel="$dir/$(basename "$built")"
    echo "built $(basename "$wheel") in $((SECONDS - started)) s" >&2
fi
echo "$wheel"
