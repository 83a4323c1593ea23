"""plan_experts: which experts of a rank's MoE layers stay resident, and where the others are held.

Placement is per expert, not per layer. The resident set is the hottest experts (by `heat`, e.g.
routing counts of a calibration run; without it the lowest expert ids, the first layer's last of
all, since no earlier layer predicts its experts ahead) up to what the budget leaves after the
fixed bytes (the rank's other weights, KV cache, step activations) and the expert pool's slots:
`slots` fixed fetch buffers, each one expert's size, for every MoE layer that has a pooled expert
(pool/experts.py fetches a layer's predicted and missed experts into them). The pooled experts are
held on a peer with spare budget on the rank's own node first, then on other nodes, then in the
rank's host memory (`planner.place_held`); when nothing fits it refuses with the bytes missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardwright.pool.ledger import fmt_bytes
from shardwright.pool.planner import HOST, Holder, PoolAdmissionError, place_held

Key = tuple[int, int]  # (local MoE block index, expert id)


@dataclass
class ExpertPlan:
    """Per (block, expert): 'resident', a peer index or HOST; `slots` fetch buffers per layer."""

    placements: dict[Key, int | str] = field(default_factory=dict)
    slots: int = 0
    expert_bytes: dict[Key, int] = field(default_factory=dict)

    def pooled(self) -> dict[Key, int | str]:
        return {k: w for k, w in self.placements.items() if w != "resident"}

    def pooled_by_layer(self) -> dict[int, frozenset[int]]:
        out: dict[int, set[int]] = {}
        for layer, e in self.pooled():
            out.setdefault(layer, set()).add(e)
        return {layer: frozenset(es) for layer, es in sorted(out.items())}

    def slot_bytes(self) -> int:
        """The fetch buffers: `slots` of the largest pooled expert, per layer with a pooled expert."""
        return _slot_bytes(self.expert_bytes, list(self.pooled()), self.slots)

    def resident_expert_bytes(self) -> int:
        return sum(b for k, b in self.expert_bytes.items() if self.placements[k] == "resident")

    def describe(self) -> str:
        pooled = self.pooled()
        hosts = sorted({"host" if w == HOST else f"peer {w}" for w in pooled.values()})
        return (f"{len(self.placements) - len(pooled)}/{len(self.placements)} experts resident, "
                f"{len(pooled)} pooled ({fmt_bytes(sum(self.expert_bytes[k] for k in pooled))} on "
                f"{', '.join(hosts) or 'nothing'}), {self.slots} fetch slots per pooled layer "
                f"({fmt_bytes(self.slot_bytes())})")

    def to_dict(self) -> dict:
        return {"slots": self.slots, "slot_bytes": self.slot_bytes(),
                "pooled": {f"{layer}.{e}": w for (layer, e), w in sorted(self.pooled().items())},
                "experts_resident": len(self.placements) - len(self.pooled()), "experts": len(self.placements)}


def _slot_bytes(expert_bytes: dict[Key, int], pooled: list[Key], slots: int) -> int:
    widest: dict[int, int] = {}
    for layer, e in pooled:
        widest[layer] = max(widest.get(layer, 0), expert_bytes[(layer, e)])
    return slots * sum(widest.values())


def cold_order(expert_bytes: dict[Key, int], heat: dict[Key, float] | None = None) -> list[Key]:
    """Experts coldest first: by `heat`, else the highest ids first, taking one from each layer in
    turn (so the pooled experts spread over the layers), the first layer's last."""
    first = min((layer for layer, _ in expert_bytes), default=0)
    if heat is not None:
        return sorted(expert_bytes, key=lambda k: (k[0] == first, heat.get(k, 0.0), -k[1], k[0]))
    return sorted(expert_bytes, key=lambda k: (k[0] == first, -k[1], k[0]))


def plan_experts(expert_bytes: dict[Key, int], *, budget_bytes: int, fixed_bytes: int, slots: int, node: str = "",
                 peers: list[Holder] | None = None, host_bytes: int = 0, heat: dict[Key, float] | None = None,
                 force_fraction: float | None = None) -> ExpertPlan:
    """Pool the fewest experts that make the rank fit `budget_bytes` (or `force_fraction` of them,
    for benchmarks); raises PoolAdmissionError with the missing bytes."""
    if slots < 1:
        raise ValueError(f"an expert pool needs at least one fetch slot per layer, got slots={slots}")
    peers = peers or []
    order = cold_order(expert_bytes, heat)
    counts = [round(force_fraction * len(order))] if force_fraction is not None else range(len(order) + 1)
    total = sum(expert_bytes.values())
    for count in counts:
        pooled = order[:count]
        need = fixed_bytes + total - sum(expert_bytes[k] for k in pooled) + _slot_bytes(expert_bytes, pooled, slots)
        if need <= budget_bytes:
            break
    else:
        raise PoolAdmissionError(
            f"the rank cannot fit its budget of {fmt_bytes(budget_bytes)} even with {len(pooled)} of "
            f"{len(order)} experts pooled: it needs {fmt_bytes(need)} resident ({fmt_bytes(fixed_bytes)} besides "
            f"the experts, plus resident experts and {slots} fetch slots per layer): "
            f"{fmt_bytes(need - budget_bytes)} missing; raise the budget, use fewer slots or a larger ep or tp")
    spare = {h.peer: h.spare_bytes for h in peers}
    where = place_held({k: expert_bytes[k] for k in pooled}, node, spare, peers, host_bytes)
    missing = sum(expert_bytes[k] for k, w in where.items() if w is None)
    if missing:
        raise PoolAdmissionError(
            f"not enough pooled memory for {len(pooled)} experts: {fmt_bytes(missing)} missing (host pool "
            f"{fmt_bytes(host_bytes)}, peers {', '.join(f'{h.peer}: {fmt_bytes(h.spare_bytes)}' for h in peers) or 'none'}"
            f"); add memory peers, raise the host pool, or use a larger ep or tp")
    for h in peers:
        h.spare_bytes = spare[h.peer]
    placements: dict[Key, int | str] = {k: "resident" for k in sorted(expert_bytes)}
    placements.update(where)
    return ExpertPlan(placements=placements, slots=slots, expert_bytes=dict(expert_bytes))
