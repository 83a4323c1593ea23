#!/usr/bin/env bash
# The GPU check: run on a machine with one NVIDIA GPU (PyTorch with CUDA, transformers, pytest; no Ray,
# Redis or registry there). Carry pydantic's wheels in .gpu_wheels/ (scripts/gpu_wheels.sh fetches them
# here). Runs the Ray-free tests that then exercise CUDA (models, parallel layers, attention, training
# with pinned-memory offload, pool units) and the decode figures beside HF generate on the same GPU.
# Output: the test summary, then one JSON line of decode figures. Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp}"
python -c "import pydantic" 2>/dev/null || python -m pip install --quiet --no-index --find-links .gpu_wheels pydantic
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
timeout 330 python -m pytest -q -x -p no:cacheprovider \
  tests/models tests/parallel tests/training/test_offload.py tests/training/test_training_units.py \
  tests/pool/test_pool_units.py -k "not ray" 2>&1 | tail -40 | tee "$out/gpu_tests.txt"
timeout 120 python scripts/gpu_decode.py --batches 1,8,32 --steps 32 | tee "$out/gpu_decode.json"
