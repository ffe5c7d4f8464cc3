#!/usr/bin/env bash
# Set up .venv and run the main job: the brain-MRI demo (offline; ~5 minutes on 2 CPU cores).
# Extra arguments go to `segpipe demo mri`, e.g. `bash scripts/demo.sh --output /tmp/mri`; the
# outputs go under the folder it is run from (outputs/demo_mri by default).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$here/scripts/setup_env.sh" demo)"
exec "$venv/bin/segpipe" demo mri "$@"
