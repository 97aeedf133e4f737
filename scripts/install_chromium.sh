#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium (/usr/bin/chromium), which tests/test_inspect.py
# uses to render the `trace-rl inspect --html` page and check its DOM. Idempotent: exits 0 at
# once when chromium is already installed. Needs root (or sudo) and apt.
#
# Usage: scripts/install_chromium.sh
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-get not found: install Chromium with your system's package manager" >&2
  exit 1
fi

sudo_cmd=()
if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "need root to install chromium (run as root or install sudo)" >&2
    exit 1
  fi
fi

start_s=$SECONDS
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
# Fonts with CJK and emoji glyphs so screenshots of non-Latin responses render legibly.
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
  chromium fonts-noto-cjk fonts-noto-color-emoji >/dev/null
echo "installed $(/usr/bin/chromium --version) in $((SECONDS - start_s)) s"
