"""Optimizer-state offload (the "Deep Optimizer States" idea): AdamW state of some layer groups in
host memory, updated on the CPU while the device updates the rest.

`OffloadedAdamW(model, cfg, fraction)` keeps the first ceil(fraction * L) decoder blocks'
AdamW state (exp_avg, exp_avg_sq) and an fp32 master copy of their parameters in host memory
(pinned on CUDA). Each step a background thread copies those gradients to the host, runs AdamW
there and copies the updated parameters back (on a side stream on CUDA, ordered by an event),
while the calling thread runs the device AdamW over every other parameter; `step` returns when
both are done. The arithmetic is torch's AdamW on the same values either way, so on the CPU the
result is bitwise that of one AdamW over everything for fp32 models (tests/training/test_offload.py);
a 16-bit model's offloaded blocks are updated on an fp32 master copy, which rounds differently
from torch's AdamW updating the 16-bit parameters in place.

Checkpoints do not see the split: `state` maps each model parameter to its AdamW state wherever
it lives, so a checkpoint written with offload loads without it and the other way round; after
a load, `sync_host_params` refreshes the host masters from the loaded parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch

from shardwright.training.optim import OptimConfig, build_optimizer


def offloaded_blocks(num_blocks: int, fraction: float) -> range:
    """The blocks whose optimizer state goes to host memory: the first ceil(fraction * n), so any
    share above 0 offloads at least one block (embeddings, final norm and head stay on the device)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"offload fraction {fraction} must be within [0, 1]")
    return range(math.ceil(fraction * num_blocks - 1e-9))


class _StateView(MutableMapping):
    """model parameter -> its AdamW state, in the device or the host optimizer."""

    def __init__(self, owner: OffloadedAdamW) -> None:
        self.owner = owner

    def _where(self, param):
        host = self.owner.host_of.get(param)
        return (self.owner.host_opt.state, host) if host is not None else (self.owner.device_opt.state, param)

    def __getitem__(self, param):
        state, key = self._where(param)
        return state[key]

    def __setitem__(self, param, value) -> None:
        state, key = self._where(param)
        state[key] = {k: v.to(key.device) if torch.is_tensor(v) and k != "step" else v for k, v in value.items()}

    def __delitem__(self, param) -> None:
        state, key = self._where(param)
        del state[key]

    def __iter__(self) -> Iterator:
        yield from (p for p in self.owner.params if p in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, param) -> bool:
        state, key = self._where(param)
        return key in state


class OffloadedAdamW:
    """AdamW with the state of some decoder blocks in host memory (see the module doc)."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, fraction: float) -> None:
        blocks = list(getattr(model, "blocks", []))
        offloaded = {id(p) for i in offloaded_blocks(len(blocks), fraction) for p in blocks[i].parameters()}
        self.params = list(model.parameters())
        device_params = [p for p in self.params if id(p) not in offloaded]
        cuda = any(p.is_cuda for p in self.params)
        self.host_of: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        for p in self.params:
            if id(p) in offloaded:
                host = torch.empty(p.shape, dtype=torch.float32, device="cpu", pin_memory=cuda)
                host.copy_(p.detach())
                self.host_of[p] = torch.nn.Parameter(host)
        self.device_opt = build_optimizer(_Params(device_params), cfg)
        self.host_opt = build_optimizer(_Params(list(self.host_of.values())), cfg) if self.host_of else None
        self.param_groups = self.device_opt.param_groups + (self.host_opt.param_groups if self.host_opt else [])
        self.state = _StateView(self)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardwright-host-adamw")
        self._stream = torch.cuda.Stream(device=self.params[0].device) if cuda else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        # CUDA: the side stream must not read a gradient before the current stream's clipping (and
        # the gradient all-reduces it waited for) have written it: order it after this event.
        grads_final = None
        if self._stream is not None:
            grads_final = torch.cuda.current_stream(self._stream.device).record_event()
        future = self._pool.submit(self._host_step, grads_final) if self.host_opt is not None else None
        self.device_opt.step()
        if future is not None:
            future.result()

    def _host_step(self, grads_final: torch.cuda.Event | None) -> None:
        stream = self._stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if grads_final is not None:
                stream.wait_event(grads_final)
            for p, host in self.host_of.items():
                host.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32, copy=True)
            if stream is not None:
                stream.synchronize()
            self.host_opt.step()
            for p, host in self.host_of.items():
                p.data.copy_(host.detach(), non_blocking=stream is not None)
            if stream is not None:
                stream.synchronize()

    def close(self) -> None:
        """Stop the host-update thread (after the step it may be running)."""
        self._pool.shutdown(wait=True)

    @torch.no_grad()
    def sync_host_params(self) -> None:
        """Host masters := the model's parameters (after they were loaded from a checkpoint)."""
        for p, host in self.host_of.items():
            host.copy_(p.detach())

    def state_bytes(self) -> dict[str, int]:
        """AdamW state bytes in device memory and in host memory (host masters included)."""
        def size(state) -> int:
            return sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))
        host = size(self.host_opt.state) + sum(h.numel() * h.element_size() for h in self.host_of.values()) \
            if self.host_opt is not None else 0
        return {"device": size(self.device_opt.state), "host": host}

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _Params(torch.nn.Module):
    """A parameter list dressed as a module, for build_optimizer's grouping."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self._list = params

    def parameters(self, recurse: bool = True):
        return iter(self._list)


def adamw_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """state_bytes of a plain AdamW: everything on the device."""
    size = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"device": size, "host": 0}
