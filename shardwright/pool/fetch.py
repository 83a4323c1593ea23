"""Pooled layers of one model: bound in place from a mapped segment, or fetched ahead of use.

A layer held by a same-node peer in a shared-memory segment that this process has mapped
(`MappedSource`) is bound once, for good, as its block's parameters: read-only views of the
segment, no copy, no thread, nothing in this worker's ledger (the bytes are the peer's). The
views keep the mapping alive, so a peer that exits or drops its segment never frees memory a
bound block reads; the pages are mapped read-only, so a write faults instead of changing them.

Every other pooled block's parameters stay on the meta device. Before block i runs,
`LayerFetcher.layer(i)` waits for its fetch (started `depth` fetched layers earlier, in a
background thread), binds the fetched tensors as the block's parameters, and after the block has
run puts the meta parameters back, drops the buffers (releasing them in the ledger) and starts
the next fetch. At most depth + 1 layers' buffers exist at once, which is what the planner
counted. Without such layers there is no background thread (`background` is False).

On CUDA each copy runs on a side stream and records an event; the compute stream waits on that
event before the block reads the weights, and the buffer is marked as used by the compute stream
so the allocator does not reuse it early. On the CPU the background thread's copy completes
before its future does.
"""

from __future__ import annotations

import threading
import time
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
    """A flat tensor this process copies from before each use (host memory, pinned on CUDA)."""

    def __init__(self, flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        super().__init__(shapes, flat.dtype)
        if flat.numel() != self.numel:
            raise ValueError(f"segment holds {flat.numel()} elements, the layer needs {self.numel}")
        self.flat = flat

    def read_into(self, flat: torch.Tensor) -> None:
        flat.copy_(self.flat, non_blocking=flat.is_cuda)


class MappedSource(LayerSource):
    """A same-node peer's segment mapped read-only here: bound in place on the CPU, never copied
    (`read_into` copies it to another device).

    `flat` is a read-only view of the mapping; `mapping` is the mapping itself, held so it stays
    open (the views also pin it: it cannot be closed while one exists).
    """

    def __init__(self, flat: torch.Tensor, shapes: list[tuple[int, ...]], mapping: object) -> None:
        super().__init__(shapes, flat.dtype)
        if flat.numel() != self.numel:
            raise ValueError(f"segment holds {flat.numel()} elements, the layer needs {self.numel}")
        self.flat, self.mapping = flat, mapping

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
    """The pooled layers of one model: mapped ones bound in place, the others prefetched in layer
    order, `depth` ahead, by one background thread (only if there are any)."""

    def __init__(self, blocks: nn.ModuleList, sources: dict[int, LayerSource], ledger: MemoryLedger,
                 device: torch.device, depth: int = 2) -> None:
        self.ledger, self.device, self.depth = ledger, device, depth
        self._slots = {i: param_slots(blocks[i]) for i in sources}
        self._meta = {i: [m._parameters[n] for m, n in self._slots[i]] for i in sources}
        for i, source in sources.items():
            shapes = [tuple(p.shape) for p in self._meta[i]]
            if shapes != source.shapes or any(p.dtype != source.dtype for p in self._meta[i]):
                raise ValueError(f"pooled layer {i}: source shapes {source.shapes} ({source.dtype}) != block "
                                 f"{shapes} ({self._meta[i][0].dtype if self._meta[i] else 'no parameters'})")
        in_place = device.type == "cpu"
        self.bound = {i: s for i, s in sources.items() if in_place and isinstance(s, MappedSource)}
        self.sources = {i: s for i, s in sources.items() if i not in self.bound}  # fetched before use
        self.order = sorted(self.sources)
        for i, source in self.bound.items():
            self._bind(i, source.flat, source.shapes)
        self.bytes_mapped = sum(s.nbytes for s in self.bound.values())  # on the peers' ledgers, not ours
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardwright-prefetch")
                      if self.order else None)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" and self.order else None
        self._pending: dict[int, Future] = {}
        self._next = 0  # index into self.order of the next layer to fetch
        self._lock = threading.Lock()
        self.bytes_fetched = 0
        self.fetch_s = 0.0  # the background thread's time copying layers
        self.wait_s = 0.0  # the compute thread's time waiting for a fetch (the part not hidden)

    def traffic(self) -> dict:
        """Totals since start: bytes fetched and bound, fetch seconds, and seconds the step waited."""
        with self._lock:
            return {"bytes_fetched": self.bytes_fetched, "bytes_mapped": self.bytes_mapped,
                    "fetch_s": self.fetch_s, "fetch_wait_s": self.wait_s}

    @property
    def background(self) -> bool:
        """Whether a background thread fetches layers (False when every pooled layer is bound)."""
        return self._pool is not None

    def _bind(self, i: int, flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        for (module, name), t in zip(self._slots[i], views(flat, shapes)):
            module._parameters[name] = nn.Parameter(t, requires_grad=False)

    def _unbind(self, i: int) -> None:
        for (module, name), meta in zip(self._slots[i], self._meta[i]):
            module._parameters[name] = meta

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
        started = time.perf_counter()
        flat, event = future.result()
        with self._lock:
            self.wait_s += time.perf_counter() - started
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            flat.record_stream(torch.cuda.current_stream(self.device))
        self._bind(i, flat, self.sources[i].shapes)
        try:
            yield
        finally:
            self._unbind(i)
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
        """Stop fetching and unbind every layer (the mappings close once nothing else holds them)."""
        self.abort()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for i in self.bound:
            self._unbind(i)
        self.bound = {}

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
        started = time.perf_counter()
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
            self.fetch_s += time.perf_counter() - started  # on CUDA: the time to enqueue the copy
        return flat, event
