#!/usr/bin/env bash
# The test command: creates .venv in the repo root, installs the project with its extras and
# runs ruff and pytest. Extra arguments go to pytest (e.g. ./scripts/test.sh -k settings).
# On a fresh Debian/Ubuntu machine it also installs the system packages the tests use
# (set EDGE_SKIP_APT=1 to skip that step).
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-venv: the install.sh tests build venvs with ensurepip.
# ffmpeg: codec test files; chromium: the browser test; espeak-ng: synthetic meetings.
APT_PACKAGES=(libsystemd-dev pkg-config systemd shellcheck bats sox python3-venv ffmpeg chromium espeak-ng)
# node + npm: Deepgram's JS SDK test (a node that ships its own npm, e.g. nodesource's, is kept).
command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)

if [[ "${EDGE_SKIP_APT:-0}" != 1 ]] && command -v apt-get >/dev/null; then
  # shellcheck source=scripts/apt.sh
  . scripts/apt.sh
  apt_install "${APT_PACKAGES[@]}"
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# On x86_64 without a GPU, take torch's CPU build first so nothing pulls a CUDA build.
if [[ $(uname -m) == x86_64 ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" torch==2.13.0
fi
extras="dev,diarization,eval"
if pkg-config --exists libsystemd 2>/dev/null; then extras+=",systemd"; fi
"${pip[@]}" -e ".[${extras}]"

.venv/bin/ruff check edge tests scripts
exec .venv/bin/python -m pytest "$@"
