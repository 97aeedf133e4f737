#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one JSON report, on a GPU machine that has torch,
# transformers and accelerate but no registry access and none of this project's other packages.
#
#   benchmarks/gpu_check.sh prepare        here, with a registry: the wheels it brings along
#   benchmarks/gpu_check.sh [ARGS...]      there: the check (ARGS go to gpu_check.py, e.g.
#                                          --device cpu --tiny to rehearse on a CPU)
#
# The wheels (pydantic and its pure-Python dependencies, pydantic-core for CPython 3.10-3.13,
# versions from constraints.txt) go to build/gpu_wheels, an ignored folder of about 10 MB; carry
# it to the GPU machine with the checkout. The check stops after 8 minutes whatever happens.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="$repo/build/gpu_wheels"
python="${PYTHON:-python3}"

pin() { grep -iE "^$1==" "$repo/constraints.txt" | head -1; }

if [[ "${1:-}" == "prepare" ]]; then
  rm -rf "$wheels" && mkdir -p "$wheels"
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
    "$(pin pydantic)" "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin typing[-_]extensions)"
  for v in 3.10 3.11 3.12 3.13; do
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
      --platform manylinux2014_x86_64 --python-version "$v" --implementation cp "$(pin pydantic[-_]core)"
  done
  du -sh "$wheels"
  ls "$wheels"
  exit 0
fi

args=("$@")
[[ -d "$wheels" ]] && args=(--wheels "$wheels" "${args[@]}")
exec timeout 480 "$python" "$repo/benchmarks/gpu_check.py" "${args[@]}"
