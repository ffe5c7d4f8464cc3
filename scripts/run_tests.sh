#!/usr/bin/env bash
# Set up .venv and run the test suite (default run: everything not marked slow).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m slow`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$here/scripts/setup_env.sh" test)"
cd "$here"
exec "$venv/bin/python" -m pytest -q "$@"
