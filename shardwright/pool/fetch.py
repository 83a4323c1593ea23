"""Fetching pooled layers ahead of use, binding them into their block, dropping them after.

A pooled block's parameters stay on the meta device. Before block i runs, `LayerFetcher.layer(i)`
waits for its fetch (started `depth` pooled layers earlier, in a background thread), binds the
fetched tensors as the block's parameters, and after the block has run puts the meta parameters
back, drops the buffers (releasing them in the ledger) and starts the next fetch. At most
depth + 1 layers' buffers exist at once, which is what the planner counted.

On CUDA each copy runs on a side stream and records an event; the compute stream waits on that
event before the block reads the weights, and the buffer is marked as used by the compute stream
so the allocator does not reuse it early. On the CPU the background thread's copy completes
before its future does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn

from shardwright.pool.ledger import MemoryLedger


def param_slots(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every parameter of `block`, in `block.parameters()` order."""
    return [(m, n) for m in block.modules() for n, p in m._parameters.items() if p is not None]


class LayerSource:
    """Where one pooled layer's weights live; `read_into(flat)` copies them into `flat`."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.dtype = dtype
        self.numel = sum(_numel(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def read_into(self, flat: torch.Tensor) -> None:
        raise NotImplementedError


class TensorSource(LayerSource):
    """A flat tensor this process can read: a peer's shared segment mapped here, or host memory."""

    def __init__(self, flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(shapes, flat.dtype)
        if flat.numel() != self.numel:
            raise ValueError(f"segment holds {flat.numel()} elements, the layer needs {self.numel}")
        self.flat = flat

    def read_into(self, flat: torch.Tensor) -> None:
        flat.copy_(self.flat, non_blocking=flat.is_cuda)


class CallSource(LayerSource):
    """A layer held by a peer elsewhere: `call()` returns its tensors (e.g. a Ray actor call)."""

    def __init__(self, call: Callable[[], list[torch.Tensor]], shapes: list[tuple[int, ...]],
                 dtype: torch.dtype) -> None:
        super().__init__(shapes, dtype)
        self.call = call

    def read_into(self, flat: torch.Tensor) -> None:
        offset = 0
        for t in self.call():
            n = t.numel()
            flat[offset: offset + n].copy_(t.reshape(-1), non_blocking=flat.is_cuda)
            offset += n
        if offset != self.numel:
            raise RuntimeError(f"peer returned {offset} elements for a layer of {self.numel}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = _numel(shape)
        out.append(flat[offset: offset + n].view(shape))
        offset += n
    return out


class LayerFetcher:
    """Prefetches the pooled layers of one model, in layer order, `depth` ahead."""

    def __init__(self, blocks: nn.ModuleList, sources: dict[int, LayerSource], ledger: MemoryLedger,
                 device: torch.device, depth: int = 2) -> None:
        self.blocks, self.sources, self.ledger = blocks, dict(sources), ledger
        self.device, self.depth = device, depth
        self.order = sorted(self.sources)
        self._slots = {i: param_slots(blocks[i]) for i in self.order}
        self._meta = {i: [m._parameters[n] for m, n in self._slots[i]] for i in self.order}
        for i in self.order:
            shapes = [tuple(p.shape) for p in self._meta[i]]
            if shapes != self.sources[i].shapes:
                raise ValueError(f"pooled layer {i}: source shapes {self.sources[i].shapes} != block {shapes}")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardwright-prefetch")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, Future] = {}
        self._next = 0  # index into self.order of the next layer to fetch
        self._lock = threading.Lock()
        self.bytes_fetched = 0

    # ---- the model's hooks ----------------------------------------------------------------
    def begin_pass(self) -> None:
        """Start of a forward pass over the stage: fetch the first depth + 1 pooled layers."""
        self.abort()
        self._next = 0
        for _ in range(min(self.depth + 1, len(self.order))):
            self._start_next()

    @contextmanager
    def layer(self, i: int) -> Iterator[None]:
        if i not in self.sources:
            yield
            return
        future = self._pending.pop(i, None)
        if future is None:  # out of the planned order (should not happen): fetch it now
            future = self._submit(i)
        flat, event = future.result()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            flat.record_stream(torch.cuda.current_stream(self.device))
        slots = self._slots[i]
        for (module, name), t in zip(slots, views(flat, self.sources[i].shapes)):
            module._parameters[name] = nn.Parameter(t, requires_grad=False)
        try:
            yield
        finally:
            for (module, name), meta in zip(slots, self._meta[i]):
                module._parameters[name] = meta
            del flat
            self.ledger.release("pooled_fetch", self.sources[i].nbytes)
            self._start_next()

    def abort(self) -> None:
        """Drop fetches of an interrupted pass (their buffers are released)."""
        pending, self._pending = self._pending, {}
        for i, future in pending.items():
            try:
                future.result()
            except Exception:
                continue
            self.ledger.release("pooled_fetch", self.sources[i].nbytes)

    def close(self) -> None:
        self.abort()
        self._pool.shutdown(wait=True)

    # ---- background fetches ---------------------------------------------------------------
    def _start_next(self) -> None:
        if self._next < len(self.order):
            i = self.order[self._next]
            self._next += 1
            self._pending[i] = self._submit(i)

    def _submit(self, i: int) -> Future:
        return self._pool.submit(self._fetch, i)

    def _fetch(self, i: int):
        source = self.sources[i]
        self.ledger.reserve("pooled_fetch", source.nbytes)
        try:
            flat = torch.empty(source.numel, dtype=source.dtype, device=self.device)
            if self._stream is None:
                source.read_into(flat)
                event = None
            else:
                with torch.cuda.stream(self._stream):
                    source.read_into(flat)
                    event = torch.cuda.Event()
                    event.record(self._stream)
        except BaseException:
            self.ledger.release("pooled_fetch", source.nbytes)
            raise
        with self._lock:
            self.bytes_fetched += source.nbytes
        return flat, event
