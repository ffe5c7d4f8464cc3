#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the checkout and install segpipe with the
# extras named in $1 (default: test). Reinstalls only when pyproject.toml or the extras change.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
venv="${SEGPIPE_VENV:-$here/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "segpipe: creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.segpipe-installed"
want="$(cat "$here/pyproject.toml" | sha256sum | cut -c1-16) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "segpipe: installing segpipe[$extras] into $venv (a few minutes the first time)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -e "$here[$extras]" >&2
  echo "$want" > "$stamp"
fi
