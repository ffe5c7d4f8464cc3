#!/usr/bin/env bash
# Fetch, on this machine, the wheels that the lent GPU machine's image lacks, for
# scripts/device_bench.sh (the image has torch, Lightning, timm, torchmetrics and OpenCV; see
# ../.library/device/README.md and KINDS.md). The versions are those of this checkout's .venv,
# for CPython 3.12 on manylinux x86-64. They land in .whl/ (in .gitignore), which the device
# call carries.
#
#   bash scripts/device_wheels.sh          # then: device run, carry [".whl"], command below
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. bash scripts/device_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "device_wheels: no .venv here; run: bash scripts/setup_env.sh test" >&2; exit 1; }
# segpipe's dependencies (and theirs) that the device image does not hold.
names="segmentation-models-pytorch albumentations albucore simsimd stringzilla pydantic pydantic-core
annotated-types typing-inspection jsonargparse docstring-parser typeshed-client rasterio affine
cligj click-plugins"
pins=$("$py" - $names <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
PY
)
rm -rf .whl && mkdir -p .whl
plat=""
for n in 17 24 27 28 31 34 35; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $plat --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl $pins
ls .whl
du -sh .whl
