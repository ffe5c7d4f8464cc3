#!/usr/bin/env bash
# Set up .venv and run the main job: the brain-MRI demo (offline; ~5 minutes on 2 CPU cores).
# Extra arguments go to `segpipe demo mri`, e.g. `bash scripts/demo.sh --output /tmp/mri`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup_env.sh" demo
cd "$here"
exec "$here/.venv/bin/segpipe" demo mri "$@"
