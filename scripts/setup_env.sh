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
