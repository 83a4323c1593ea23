"""The cluster scheduler: plain policies and placement (model, placement, policies, sim) and the
live service that runs them on Ray with its state in Redis (service)."""

from __future__ import annotations

__all__ = ["SchedulerConfig", "SchedulerService"]


def __getattr__(name: str):
    # Lazy: the simulator and policies must import without Ray, Redis or torch.
    if name in __all__:
        from shardwright.scheduler import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
