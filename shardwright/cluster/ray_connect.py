"""Connect to a Ray cluster: one joined by address, Shardwright's own local head, or an in-process one.

On a machine without CUDA, a local cluster advertises *logical* GPUs (Ray resources with no
device behind them) so that GPU-shaped gangs can be placed; workers then use CPU tensors and gloo.

- `connect`: the one-shot commands (`generate`, `run`, `demo`): join `Settings.ray_address`, else
  start Ray inside this process (it ends with the process).
- `connect_serving`: `serve`: join `Settings.ray_address`, else the local head of the state dir
  (cluster/local_head.py), started as a process of its own if none runs, so that the jobs' detached
  controller actors outlive the server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import ray

from shardwright.config import Settings

log = logging.getLogger(__name__)
ADDRESS_FIX = "start it with `ray start --head`, or unset SHARDWRIGHT_RAY_ADDRESS/RAY_ADDRESS for a local one"


def default_num_gpus(min_gpus: int = 1) -> int:
    """GPUs of a local cluster: the CUDA devices, else `min_gpus` logical ones (at least 4)."""
    import torch

    return torch.cuda.device_count() or max(4, min_gpus)


def connect(settings: Settings | None = None, *, min_gpus: int = 1) -> dict:
    """Join `settings.ray_address` if set, else reuse this process's Ray, else start a local one.

    Returns the cluster's resources. A local cluster on a CPU-only machine gets `min_gpus`
    logical GPUs (at least 4).
    """
    settings = settings or Settings.from_env()
    if ray.is_initialized():
        return ray.cluster_resources()
    if settings.ray_address:
        return _join(settings.ray_address, ADDRESS_FIX)
    import torch

    gpus = default_num_gpus(min_gpus)
    log.info("starting a local Ray cluster with %d %s GPUs", gpus,
             "physical" if torch.cuda.is_available() else "logical")
    ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray.cluster_resources()


def connect_serving(settings: Settings, *, num_gpus: int | None = None, num_cpus: int | None = None,
                    progress: Callable[[str], None] = log.info) -> dict:
    """Join `settings.ray_address` if set, else the state dir's local head (started if none runs,
    with `num_gpus`, default `default_num_gpus()`, and `num_cpus`, default Ray's count).

    Returns the cluster's resources. Ray reads its authentication mode only from the environment, so
    joining the local head sets RAY_AUTH_MODE in this process to the head's (as `ray.init` does itself
    for a cluster it starts).
    """
    from shardwright.cluster.local_head import ensure_head

    if ray.is_initialized():
        return ray.cluster_resources()
    if settings.ray_address:
        if num_gpus is not None or num_cpus is not None:
            log.warning("--num-gpus/--num-cpus apply to the local Ray head only; the cluster at %s keeps its own "
                        "resources", settings.ray_address)
        return _join(settings.ray_address, ADDRESS_FIX)
    head, started = ensure_head(settings.state_dir, num_gpus=num_gpus or default_num_gpus(), num_cpus=num_cpus,
                                auth_mode=settings.ray_auth_mode, progress=progress)
    if not started:
        progress(f"joining the local Ray head at {head.address} (pid {head.pid}, {head.num_gpus} GPUs), "
                 f"started earlier for {settings.state_dir}")
        if num_gpus not in (None, head.num_gpus) or num_cpus not in (None, head.num_cpus):
            log.warning("--num-gpus/--num-cpus apply when the head starts; this one runs with %d GPUs and %s CPUs "
                        "(`shardwright stop` ends it, ending its jobs)", head.num_gpus, head.num_cpus or "Ray's")
    _set_auth_mode(head.auth_mode)
    return _join(head.address, f"`shardwright stop --state-dir {settings.state_dir}` ends a broken head (and its "
                               "jobs); the next `serve` starts a new one")


def _set_auth_mode(mode: str) -> None:
    """RAY_AUTH_MODE for this process's Ray, which read its config when first imported: set it and
    have Ray read its environment again, as `ray.init` does itself when it turns token auth on for a
    cluster it starts (Ray releases without token authentication have neither; then nothing to do)."""
    os.environ["RAY_AUTH_MODE"] = mode
    try:
        from ray._raylet import Config
    except ImportError:
        return
    Config.initialize("")


def _join(address: str, fix: str) -> dict:
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {err}; {fix}") from err
    return ray.cluster_resources()
