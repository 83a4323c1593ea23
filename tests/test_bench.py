"""`shardwright bench` as a user runs it: a progress line per point on stderr, and a failing point that
is reported (layout and error) without losing the points already measured, exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scheduler import PHILLY  # noqa: E402


def run_bench(name: str, *, fail_point: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SHARDWRIGHT_BENCH_FAIL_POINT", None)
    if fail_point is not None:
        env["SHARDWRIGHT_BENCH_FAIL_POINT"] = fail_point
    return subprocess.run([sys.executable, "-m", "shardwright.api.cli", "bench", name, "--quick", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.skipif(not PHILLY.is_file(), reason=f"Philly trace not found at {PHILLY} (shared/traces)")
def test_a_failing_point_is_reported_and_the_other_points_survive():
    # The scheduler bench: 5 policies simulated on one Philly week, then 5 x 2 pass timings = 15
    # points; the injected failure hits the priority policy's 3 points (the simulation, 2 passes).
    done = run_bench("scheduler", fail_point="policy=priority")
    assert done.returncode == 1, done.stderr[-3000:]
    progress = [line for line in done.stderr.splitlines() if line.startswith("[bench scheduler] point ")]
    assert len(progress) == 15, done.stderr[-3000:]
    failed_lines = [line for line in progress if ": FAILED in " in line]
    assert len(failed_lines) == 3 and all("policy=priority" in line and "InjectedFailure" in line
                                          for line in failed_lines), failed_lines
    assert progress[0].startswith("[bench scheduler] point 1: slice=days 20-27") and ": ok in " in progress[0]

    report = json.loads(done.stdout.splitlines()[-1])  # the JSON line stays last on stdout
    assert [(f.get("slice") or f.get("pass"), f["policy"]) for f in report["failed"]] == [
        ("days 20-27 (5729 jobs)", "priority"), ("busy", "priority"), ("draining", "priority")]
    assert all("SHARDWRIGHT_BENCH_FAIL_POINT" in f["error"] for f in report["failed"])
    simulated = {r["policy"]: r for r in report["results"] if r["slice"].startswith("days")}
    assert set(simulated) == {"fifo", "fairshare", "backfill", "las"}  # measured before and after the failure
    assert simulated["fifo"]["jct_vs_fifo"] == 1.0 and simulated["las"]["avg_jct_s"] > 0
    passes = {r["policy"]: r for r in report["results"] if r["slice"].startswith("one pass")}
    assert "pass_busy_ms" not in passes["priority"] and passes["las"]["pass_draining_ms"] > 0
    assert "FAILED: InjectedFailure" in done.stdout  # the human summary names it too


def test_a_malformed_fail_point_is_a_one_line_error():
    done = run_bench("scheduler", fail_point="policy")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "shardwright bench: SHARDWRIGHT_BENCH_FAIL_POINT='policy': expected key=value[,key=value...]")


# ---- bench decode: the bytes a step reads (MBU) and the vLLM baseline's skip path ---------------

TINY = dict(architecture="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
            num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=64, norm_eps=1e-5)


def test_a_decode_step_reads_the_weights_one_embedding_row_per_token_and_the_kv():
    from benchmarks.roofline import kv_read_bytes, step_read_bytes, weight_read_bytes
    from shardwright.config import ModelSpec

    spec = ModelSpec(**TINY)
    # By hand, in elements: per layer q 8x8 + k 8x4 + v 8x4 + o 8x8 + MLP 3 x 8x16 + 2 norms x 8 = 592;
    # 2 layers 1184, final norm 8, LM head 100x8 = 800, and of the 100x8 embedding 3 rows of 8 = 24.
    assert weight_read_bytes(spec, 3, "float32") == (1184 + 8 + 800 + 24) * 4 == 8064
    # KV: K and V of 1 head x 4 per token and layer = 8 elements; contexts 5 + 10 + 20 tokens, 2 layers.
    assert kv_read_bytes(spec, [5, 10, 20], "float32") == 35 * 8 * 2 * 4 == 2240
    assert step_read_bytes(spec, [5, 10, 20], "float32") == 8064 + 2240
    assert step_read_bytes(spec, [5, 10, 20], "bfloat16") == (8064 + 2240) // 2
    # Tied: the LM head reads the shared table whole, the lookup its rows; the same bytes.
    assert weight_read_bytes(ModelSpec(**TINY, tie_word_embeddings=True), 3, "float32") == 8064
    # A sliding window of 8 on layer 0 only: it reads 5 + 8 + 8 tokens there, 35 on layer 1.
    windowed = ModelSpec(**TINY, sliding_window=8, sliding_window_layers=[0])
    assert kv_read_bytes(windowed, [5, 10, 20], "float32") == (21 + 35) * 8 * 4


def test_the_weight_bytes_match_the_tensors_of_a_real_checkpoint(tmp_path):
    # The same count from the tensors a checkpoint really holds: all of them but the embedding
    # table, plus one embedding row per token (exact: integer element counts).
    import json as _json
    import struct

    from benchmarks.roofline import weight_read_bytes
    from shardwright.config import ModelSpec
    from shardwright.models.random_init import write_random_checkpoint

    spec = ModelSpec(**TINY)
    directory = write_random_checkpoint(tmp_path / "tiny", spec)
    (file,) = directory.glob("*.safetensors")
    raw = file.read_bytes()
    header = _json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    numel = {k: _prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    embed = numel.pop("model.embed_tokens.weight")
    assert embed == 100 * 8
    assert weight_read_bytes(spec, 3, "float32") == (sum(numel.values()) + 3 * 8) * 4


def _prod(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _unreachable_registry_env() -> dict[str, str]:
    """pip with no config, no local wheels and an index on a closed local port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: connection refused
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=f"http://127.0.0.1:{port}/simple",
               PIP_NO_CACHE_DIR="1")
    return env


def test_without_a_registry_the_vllm_baseline_is_skipped_with_one_line_saying_why(tmp_path):
    # The real path on a real (fresh) venv: pip cannot reach the registry, so no vLLM is installed
    # (no download in tests), the environment is not marked finished, and the bench is told why.
    from benchmarks.vllm_baseline import STAMP, VllmUnavailable, ensure_vllm_venv, vllm_or_reason

    venv, lines = tmp_path / "vllm", []
    env = _unreachable_registry_env()
    with pytest.raises(VllmUnavailable) as err:
        ensure_vllm_venv(venv, lines.append, env)
    message = str(err.value)
    assert "\n" not in message and "the package registry is unreachable" in message and "--no-vllm" in message
    assert message.startswith("could not pip install torch==2.13.0"), message
    assert (venv / "bin" / "python").is_file() and not (venv / STAMP).exists()
    assert lines[0] == f"vLLM baseline: creating a virtual environment at {venv}"

    lines.clear()  # a second try reuses the venv, fails the same way, and the bench goes on without vLLM
    python, reason = vllm_or_reason(True, venv, lines.append, env)
    assert python is None and reason == message
    assert lines[-1] == f"vLLM baseline skipped: {message}"
    assert vllm_or_reason(False, venv, lines.append, env) == (None, "not run (--no-vllm)")


def test_a_finished_vllm_environment_is_used_as_it_is(tmp_path):
    # Idempotent: a venv whose stamp names these versions is returned without running pip.
    from benchmarks.vllm_baseline import STAMP, TORCH_VERSION, VLLM_VERSION, ensure_vllm_venv

    venv, lines = tmp_path / "vllm", []
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / STAMP).write_text(json.dumps({"vllm": VLLM_VERSION, "torch": TORCH_VERSION}))
    assert ensure_vllm_venv(venv, lines.append, _unreachable_registry_env()) == venv / "bin" / "python"
    assert lines == []


def test_an_option_a_benchmark_does_not_take_is_a_one_line_error():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "shardwright.api.cli", "bench", "scheduler", "--mixed"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "shardwright bench: --mixed is not an option of bench scheduler"


def test_the_families_bench_configs_are_the_families_it_names(tmp_path):
    # `bench families` compares the families at one shape: each config transformers writes must
    # parse to its own family's features, and the MoE ones to 8 experts of which 2 are chosen.
    pytest.importorskip("transformers", reason="bench families builds its checkpoints with transformers")
    from benchmarks.families import FAMILIES, _config
    from shardwright.config import ModelSpec

    specs = {}
    for family in FAMILIES:
        (tmp_path / family).mkdir()
        _config(family, 2).to_json_file(tmp_path / family / "config.json")
        specs[family] = ModelSpec.from_hf_dir(tmp_path / family)
    assert all(s.hidden_size == 512 and s.num_layers == 2 for s in specs.values())
    assert specs["qwen2"].qkv_bias and specs["qwen3"].qk_norm and specs["mistral"].sliding_window == 1024
    assert specs["gemma2"].final_logit_softcap and specs["gemma2"].post_norms
    assert specs["llama"].num_experts is None or specs["llama"].num_experts <= 1
    for moe in ("mixtral", "qwen2_moe"):
        assert (specs[moe].num_experts, specs[moe].experts_per_token) == (8, 2), moe
    assert specs["qwen2_moe"].shared_expert_intermediate_size == 1536
