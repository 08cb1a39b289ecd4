#!/usr/bin/env bash
# Install napari-pathoseg and everything it needs on a fresh Debian/Ubuntu machine.
#   bash scripts/setup.sh           the plugin, napari and the CPU build of torch
#   bash scripts/setup.sh --test    also Xvfb + GL libraries and the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# system libraries napari/Qt need (OpenGL, xcb, and a virtual screen for headless use)
APT_PKGS="xvfb libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxkbcommon0 libxcb-cursor0 libdbus-1-3 \
libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 \
libxcb-xfixes0 libxcb-xkb1 libfontconfig1"
if command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
  fi
fi

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
if ! $PY -c "import torch" >/dev/null 2>&1; then
  $PY -m pip install -q "torch==2.13.0"
fi
if [ "$want_test" = 1 ]; then
  $PY -m pip install -q -e ".[napari,testing]"
else
  $PY -m pip install -q -e ".[napari]"
fi
# pyenv installs need their shims refreshed before `pathoseg` is on PATH
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
