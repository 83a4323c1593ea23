"""Connect to a Ray cluster, or start a local one when none is configured.

On a machine without CUDA, the local cluster advertises *logical* GPUs (Ray resources with no
device behind them) so that GPU-shaped gangs can be placed; workers then use CPU tensors and gloo.
"""

from __future__ import annotations

import logging

import ray

from shardwright.config import Settings

log = logging.getLogger(__name__)


def connect(settings: Settings | None = None, *, min_gpus: int = 1) -> dict:
    """Join `settings.ray_address` if set, else reuse this process's Ray, else start a local one.

    Returns the cluster's resources. A local cluster on a CPU-only machine gets `min_gpus`
    logical GPUs (at least 4).
    """
    settings = settings or Settings.from_env()
    if ray.is_initialized():
        return ray.cluster_resources()
    if settings.ray_address:
        try:
            ray.init(address=settings.ray_address, log_to_driver=False)
        except ConnectionError as err:
            raise ConnectionError(
                f"cannot reach the Ray cluster at {settings.ray_address}: {err}; start it with "
                "`ray start --head` or unset SHARDWRIGHT_RAY_ADDRESS/RAY_ADDRESS for a local one"
            ) from err
        return ray.cluster_resources()
    import torch

    gpus = torch.cuda.device_count() or max(4, min_gpus)
    log.info("starting a local Ray cluster with %d %s GPUs", gpus,
             "physical" if torch.cuda.is_available() else "logical")
    ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray.cluster_resources()
