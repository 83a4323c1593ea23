#!/usr/bin/env bash
# Fetch pydantic's wheels (CPython 3.x manylinux x86_64) into .gpu_wheels/ for the GPU machine, which has
# no package registry. Run here before carrying .gpu_wheels with scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download --quiet --dest .gpu_wheels --only-binary=:all: pydantic
ls .gpu_wheels
