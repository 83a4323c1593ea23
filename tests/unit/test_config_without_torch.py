"""`shardwright.config`, the Hugging Face translation and the scheduler's pure policy modules
(model, placement, policies) import in a Python without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A meta-path finder that refuses torch, as if it were not installed; then the config layer is
# imported and used (from_hf_config reaches hf_config lazily). A stray torch import fails it.
_PROBE = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None
sys.meta_path.insert(0, NoTorch())
from shardwright.config import ModelSpec, parse_job
spec = ModelSpec.from_hf_config({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_head": 2,
                                 "n_layer": 1})
assert spec.num_layers == 1, spec
import shardwright.scheduler.model, shardwright.scheduler.placement, shardwright.scheduler.policies
assert "torch" not in sys.modules
print("ok")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_config_imports_with_torch_hidden():
    result = _run(_PROBE)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_probe_would_see_a_torch_import():
    # The hook must be able to fail the test: importing the models (which need torch) fails.
    result = _run(_PROBE.replace("from shardwright.config import",
                                "import shardwright.models.decoder\nfrom shardwright.config import"))
    assert result.returncode != 0 and "hidden by the test" in result.stderr
