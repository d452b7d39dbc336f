#!/usr/bin/env bash
# Creates .venv with Python 3.12 (jax 0.11.x needs it) and installs requirements.txt.
# Usage: bash scripts/setup.sh [VENV_DIR]    (default: .venv in the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"

is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

find_python312() {
  # The pyenv shim `python3.12` fails unless PYENV_VERSION is set, so try real
  # interpreters first, then the shim with a version picked for it.
  local cand
  for cand in "${PYTHON:-}" /root/.pyenv/versions/3.12*/bin/python3.12 \
              "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
              /usr/local/bin/python3.12 /usr/bin/python3.12 python3.12; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && is_py312 "$cand" && { echo "$cand"; return; }
  done
  if command -v pyenv >/dev/null 2>&1; then
    local v; v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | tail -n 1 || true)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return; fi
  fi
  echo "error: no Python 3.12 found (jax 0.11.x needs it); set PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [ ! -x "$venv/bin/python" ] || ! is_py312 "$venv/bin/python"; then
  py=$(find_python312)
  echo "Creating $venv with $py"
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r requirements.txt
echo "Environment ready: $venv/bin/python"
