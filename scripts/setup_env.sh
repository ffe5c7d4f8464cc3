#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the checkout (or $SEGPIPE_VENV) and install
# segpipe with the extras named in $1 (default: test). Reinstalls only when pyproject.toml or the
# extras change. Prints the environment's folder on stdout (demo.sh and run_tests.sh use it).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
venv="${SEGPIPE_VENV:-$here/.venv}"
python="${PYTHON:-python3}"
usable() {  # a Python >= 3.10 with pip
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null &&
    "$1" -m pip --version >/dev/null 2>&1
}
if [ -e "$venv" ] && ! usable "$venv/bin/python"; then
  # half made (python -m venv without ensurepip) or made by a Python older than 3.10: it would
  # fail the same way at every run
  echo "segpipe: $venv has no Python >= 3.10 with pip; making it again" >&2
  rm -rf "$venv"
fi
if [ ! -e "$venv" ]; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "segpipe: needs Python >= 3.10; $python is $("$python" --version 2>&1 | head -1 || echo missing)." \
      "Install one, or name it: PYTHON=python3.11 bash $0" >&2
    exit 1
  fi
  echo "segpipe: creating virtual environment $venv" >&2
  if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"
    echo "segpipe: could not create $venv with $python -m venv (on Debian/Ubuntu: apt install" \
      "python3-venv)" >&2
    exit 1
  fi
fi
# The stamp records pyproject.toml's hash and every extra installed with it, so the demo's and
# the tests' extras, asked for in turn, install once each (not at every switch).
stamp="$venv/.segpipe-installed"
hash="$(sha256sum < "$here/pyproject.toml" | cut -c1-16)"
have=""
if [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" = "$hash" ]; then
  have="$(cut -s -d' ' -f2 "$stamp")"
fi
all="$(printf '%s\n' ${have//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
if [ "$all" != "$have" ]; then
  echo "segpipe: installing segpipe[$all] into $venv (a few minutes the first time)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -e "$here[$all]" >&2
  echo "$hash $all" > "$stamp"
fi
echo "$venv"
