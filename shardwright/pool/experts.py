"""Pooled experts of one model: fixed fetch slots per MoE layer, pre-gate prefetch, exact misses.

The experts an `ExpertPlan` pools keep their parameters on the meta device; their weights live in
a `LayerSource` each (host memory here; a peer's segment or actor call plugs in the same way).
Every MoE layer with a pooled expert owns `slots` fixed buffers, reserved in the ledger once, so
fetching never allocates and the ledger cannot pass the budget during a step. A slot keeps the
expert it was last filled with (a cache across steps and passes).

Pre-gate prediction (Pre-gated MoE): when MoE layer i is routed (`routed(i, x)`, before its
experts compute), the next MoE layer's router is applied to layer i's input x; the pooled experts
it would choose, most rows first, up to the slots, are fetched into that layer's slots by one
background thread while layer i computes. When layer i+1 runs (`bound(i+1, used)`), each expert it
uses computes in turn: resident ones as they are, pooled ones found in a slot (a hit: prefetched or
left from before) once their fetch is done, then the rest (misses), each fetched on demand into a
slot whose expert this layer has finished with. Every expert computes from its own exact weights,
so the outputs equal the all-resident model's.

Counters (`traffic()`): bytes fetched ahead and on demand, pooled experts used = hits + misses,
experts prefetched and how many of them went unused, and the predictor's own accuracy: of the
experts each predicted layer's gate chose (resident or not), the share the pre-gate predicted.

All slot bookkeeping happens on the compute thread; the background thread only copies. On CUDA
the copy runs on a side stream that first waits for the compute stream's last use of the slot,
and the compute stream waits on the copy's event before the expert reads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from shardwright.config import ModelSpec
from shardwright.models import load_model
from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.decoder import DecoderModel
from shardwright.models.moe import MoEMLP
from shardwright.models.weights import weight_plan
from shardwright.parallel.context import ParallelContext
from shardwright.pool.expert_plan import ExpertPlan, Key
from shardwright.pool.fetch import LayerSource, TensorSource, param_slots, views
from shardwright.pool.ledger import MemoryLedger
from shardwright.pool.planner import HOST
from shardwright.pool.sizing import tensor_bytes

COUNTERS = ("bytes_prefetched", "bytes_on_demand", "pooled_used", "resident_used", "hits", "misses", "prefetched",
            "prefetch_unused", "gate_chosen", "pregate_predicted")


class _Slot:
    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat
        self.expert: int | None = None
        self.pending: Future | None = None  # the background copy filling it
        self.prefetched = False  # filled by a prediction and not used since
        self.last_used = -1


class ExpertPool:
    """The pooled experts of `model` (sources by (local block, expert)), `slots` buffers per layer."""

    def __init__(self, model: DecoderModel, sources: dict[Key, LayerSource], ledger: MemoryLedger,
                 device: torch.device, *, slots: int, prefetch: bool = True) -> None:
        self.ledger, self.device, self.prefetch, self.sources = ledger, device, prefetch, sources
        self.moe = {i: b.mlp for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEMLP)}
        order = sorted(self.moe)
        self.next = dict(zip(order, order[1:]))
        self._meta = {k: self._expert(k) for k in sources}
        for k, source in sources.items():
            shapes = [tuple(m._parameters[n].shape) for m, n in param_slots(self._meta[k])]
            if shapes != source.shapes:
                raise ValueError(f"pooled expert {k}: source shapes {source.shapes} != expert {shapes}")
        widest: dict[int, LayerSource] = {}
        for (layer, _), s in sources.items():
            widest[layer] = max(widest.get(layer, s), s, key=lambda x: x.numel)
        self.slot_bytes = slots * sum(s.nbytes for s in widest.values())
        self.ledger.reserve("expert_slots", self.slot_bytes)
        self.slots = {layer: [_Slot(torch.empty(s.numel, dtype=s.dtype, device=device)) for _ in range(slots)]
                      for layer, s in widest.items()}
        for i, layer in self.moe.items():
            layer.expert_weights, layer.pool_index = self, i
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardwright-experts") \
            if prefetch and sources else None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" and self._thread else None
        self._predicted: dict[int, set[int]] = {}
        self._tick = 0
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.fetch_s = self.wait_s = self.demand_s = 0.0

    def _expert(self, key: Key) -> nn.Module:
        layer, e = key
        return self.moe[layer].experts[str(e)]

    def traffic(self) -> dict:
        """Totals since start (see the module docstring), with the rates they give."""
        c = dict(self.counts)
        used = c["hits"] + c["misses"]
        return {**c, "bytes_fetched": c["bytes_prefetched"] + c["bytes_on_demand"],
                "hit_rate": c["hits"] / used if used else None,
                "pregate_hit_rate": c["pregate_predicted"] / c["gate_chosen"] if c["gate_chosen"] else None,
                "fetch_s": self.fetch_s, "fetch_wait_s": self.wait_s, "on_demand_s": self.demand_s}

    # ---- the MoE layers' hooks ------------------------------------------------------------
    def routed(self, layer: int, x: torch.Tensor) -> None:
        """Layer `layer` got its input x [rows, hidden]: predict the next MoE layer's experts from
        it (that layer's router on x) and fetch its pooled ones ahead."""
        nxt = self.next.get(layer)
        if not self.prefetch or nxt is None:
            return
        moe = self.moe[nxt]
        _, chosen = moe.route(x)
        rows = torch.bincount(chosen.reshape(-1), minlength=moe.num_experts).tolist()
        predicted = [e for e in sorted(moe.owned, key=lambda e: -rows[e]) if rows[e]]
        self._predicted[nxt] = set(predicted)
        slots = self.slots.get(nxt)
        if slots is None:
            return
        held = {s.expert for s in slots}
        wanted = [e for e in predicted if (nxt, e) in self.sources][:len(slots)]
        free = sorted((s for s in slots if s.expert not in wanted), key=lambda s: (s.expert is not None, s.last_used))
        for e, slot in zip((e for e in wanted if e not in held), free):
            self._fill(nxt, slot, e, ahead=True)

    def bound(self, layer: int, used: list[int]) -> Iterator[int]:
        """Yield each expert of `used`, its weights bound while the caller computes it."""
        self._tick += 1
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            self.counts["gate_chosen"] += len(used)
            self.counts["pregate_predicted"] += len(predicted.intersection(used))
        pooled = [e for e in used if (layer, e) in self.sources]
        self.counts["resident_used"] += len(used) - len(pooled)
        yield from (e for e in used if (layer, e) not in self.sources)
        slots = self.slots.get(layer, [])
        in_slot = {s.expert: s for s in slots if s.expert in pooled}
        self.counts["hits"] += len(in_slot)
        self.counts["misses"] += len(pooled) - len(in_slot)
        self.counts["pooled_used"] += len(pooled)
        for e in [e for e in pooled if e in in_slot] + [e for e in pooled if e not in in_slot]:
            slot = in_slot.get(e) or self._victim(slots)
            if slot.expert != e:
                self._fill(layer, slot, e, ahead=False)
            yield from self._use(layer, slot, e)

    # ---- slots ----------------------------------------------------------------------------
    def _victim(self, slots: list[_Slot]) -> _Slot:
        """An empty slot, else the one used longest ago (this layer's already computed ones
        last): the slot its on-demand fetch overwrites."""
        return min(slots, key=lambda s: (s.expert is not None, s.last_used))

    def _use(self, layer: int, slot: _Slot, e: int) -> Iterator[int]:
        self._wait(slot)
        if slot.prefetched:
            slot.prefetched = False
        slot.last_used = self._tick
        module, source = self._expert((layer, e)), self.sources[(layer, e)]
        names = param_slots(module)
        metas = [m._parameters[n] for m, n in names]
        for (m, n), t in zip(names, views(slot.flat[: source.numel], source.shapes)):
            m._parameters[n] = nn.Parameter(t, requires_grad=False)
        try:
            yield e
        finally:
            for (m, n), meta in zip(names, metas):
                m._parameters[n] = meta

    def _wait(self, slot: _Slot) -> None:
        if slot.pending is None:
            return
        started = time.perf_counter()
        event = slot.pending.result()
        self.wait_s += time.perf_counter() - started
        slot.pending = None
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _fill(self, layer: int, slot: _Slot, e: int, *, ahead: bool) -> None:
        self._wait(slot)  # a copy still filling it (an unused prediction) must finish first
        if slot.prefetched:
            self.counts["prefetch_unused"] += 1
        source = self.sources[(layer, e)]
        slot.expert, slot.prefetched = e, ahead
        flat = slot.flat[: source.numel]
        if ahead:
            self.counts["prefetched"] += 1
            self.counts["bytes_prefetched"] += source.nbytes
            after = None
            if self._stream is not None:  # the slot's last reader on the compute stream goes first
                after = torch.cuda.Event()
                after.record(torch.cuda.current_stream(self.device))
            slot.pending = self._thread.submit(self._copy, source, flat, after)
            return
        started = time.perf_counter()
        source.read_into(flat)
        self.demand_s += time.perf_counter() - started
        self.counts["bytes_on_demand"] += source.nbytes

    def _copy(self, source: LayerSource, flat: torch.Tensor, after) -> torch.cuda.Event | None:
        started = time.perf_counter()
        event = None
        if self._stream is None:
            source.read_into(flat)
        else:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(after)
                source.read_into(flat)
                event = torch.cuda.Event()
                event.record(self._stream)
        self.fetch_s += time.perf_counter() - started
        return event

    def close(self) -> None:
        """Finish the copies in flight, detach from the layers, release the slots."""
        for slots in self.slots.values():
            for slot in slots:
                self._wait(slot)
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        for layer in self.moe.values():
            layer.expert_weights = None
        self.slots = {}
        self.ledger.release("expert_slots", self.slot_bytes)


def expert_sizes(spec: ModelSpec, ctx: ParallelContext) -> tuple[dict[Key, int], int]:
    """(bytes of each local expert by (local block, expert), every other byte of the shard)."""
    model = DecoderModel(spec, ctx, device="meta")
    sizes = {(i, e): tensor_bytes(b.mlp.experts[str(e)].parameters())
             for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEMLP) for e in b.mlp.owned}
    return sizes, tensor_bytes(model.parameters()) - sum(sizes.values())


@torch.no_grad()
def hold_experts(model_dir: str, model: DecoderModel, keys: list[Key], *, pin: bool = False) -> dict[Key, TensorSource]:
    """This rank's slices of the experts `keys` read into flat host buffers (outside the budget)."""
    prefixes = {f"blocks.{layer}.mlp.experts.{e}.": (layer, e) for layer, e in keys}
    index = {k: {id(m._parameters[n]): j for j, (m, n) in enumerate(param_slots(model.blocks[k[0]].mlp.experts[str(k[1])]))}
             for k in keys}
    parts: dict[Key, dict[int, torch.Tensor]] = {k: {} for k in keys}
    with CheckpointReader(model_dir) as reader:
        for name, param, reads in weight_plan(model, reader):
            key = next((k for p, k in prefixes.items() if name.startswith(p)), None)
            if key is None:
                continue
            values = [reader.read(r) for r in reads]
            value = values[0] if len(values) == 1 else torch.cat(values, dim=0)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint gives {name} shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            parts[key][index[key][id(param)]] = value.to(param.dtype)
    out = {}
    for key, by_slot in parts.items():
        tensors = [by_slot[j] for j in range(len(by_slot))]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        out[key] = TensorSource(flat.pin_memory() if pin else flat, [tuple(t.shape) for t in tensors])
    return out


def load_expert_pooled(model_dir: str, ctx: ParallelContext, plan: ExpertPlan, ledger: MemoryLedger, *,
                       prefetch: bool = True, dtype=None) -> tuple[ModelSpec, DecoderModel, ExpertPool]:
    """This rank's shard with `plan`'s pooled experts held in host memory: the resident weights and
    the slots in `ledger`, the pool attached to the model's MoE layers."""
    pooled = plan.pooled()
    if any(w != HOST for w in pooled.values()):
        raise ValueError("experts placed on memory peers are served through the engine; this loader holds "
                         "pooled experts in host memory (plan with host_bytes and no peers)")
    spec = ModelSpec.from_hf_dir(model_dir, dtype=dtype)
    sizes, other = expert_sizes(spec, ctx)
    ledger.reserve("weights", other + sum(b for k, b in sizes.items() if k not in pooled))
    _, model = load_model(model_dir, ctx, dtype=dtype, skip_experts=plan.pooled_by_layer())
    sources = hold_experts(model_dir, model, sorted(pooled), pin=ctx.device.type == "cuda")
    return spec, model, ExpertPool(model, sources, ledger, ctx.device, slots=plan.slots, prefetch=prefetch)
