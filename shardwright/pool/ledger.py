"""MemoryLedger: a worker's accounting of the bytes it keeps resident, against its budget.

Every tensor a worker keeps (weights, KV blocks, fetched pooled layers, the activations of the
step in progress) is reserved here before it is allocated and released when it is dropped; a
reservation that would pass the budget raises BudgetExceeded instead of allocating. The high-water
mark is what tests read. Layers bound in place from a same-node peer's mapped segment are
the peer's memory, on the peer's ledger only. Thread-safe: the prefetch thread reserves while the step computes.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class BudgetExceeded(MemoryError):
    """A reservation would take the worker past its memory budget."""


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def resolve_budget(budget: int | str | None, device) -> int | None:
    """A configured budget in bytes; 'device-free' is the CUDA device's free memory now."""
    if budget != "device-free":
        return budget
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        raise ValueError("memory budget 'device-free' needs a CUDA device; on the CPU give budget_bytes "
                         "as a number of bytes (the worker's own accounting enforces it)")
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


class MemoryLedger:
    """Resident bytes by kind, the high-water mark and the budget (None: unlimited)."""

    def __init__(self, budget_bytes: int | None, owner: str = "worker") -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {budget_bytes}")
        self.budget = budget_bytes
        self.owner = owner
        self._by_kind: dict[str, int] = defaultdict(int)
        self._resident = 0
        self._high_water = 0
        self._lock = threading.Lock()

    def reserve(self, kind: str, nbytes: int) -> None:
        """Account `nbytes` more of `kind`; raises BudgetExceeded (accounting nothing) if over."""
        if nbytes < 0:
            raise ValueError(f"cannot reserve {nbytes} bytes")
        with self._lock:
            after = self._resident + nbytes
            if self.budget is not None and after > self.budget:
                raise BudgetExceeded(
                    f"{self.owner}: {kind} needs {fmt_bytes(nbytes)} more, resident "
                    f"{fmt_bytes(self._resident)} of a {fmt_bytes(self.budget)} budget "
                    f"({fmt_bytes(after - self.budget)} over): {self._describe()}")
            self._resident = after
            self._by_kind[kind] += nbytes
            self._high_water = max(self._high_water, after)

    def release(self, kind: str, nbytes: int) -> None:
        with self._lock:
            if nbytes > self._by_kind[kind]:
                raise ValueError(f"{self.owner}: releasing {nbytes} bytes of {kind}, "
                                 f"only {self._by_kind[kind]} reserved")
            self._by_kind[kind] -= nbytes
            self._resident -= nbytes

    @property
    def resident(self) -> int:
        return self._resident

    @property
    def high_water(self) -> int:
        return self._high_water

    def reset_high_water(self) -> None:
        with self._lock:
            self._high_water = self._resident

    def snapshot(self) -> dict:
        with self._lock:
            return {"budget_bytes": self.budget, "resident_bytes": self._resident,
                    "high_water_bytes": self._high_water,
                    "by_kind": {k: v for k, v in self._by_kind.items() if v}}

    def _describe(self) -> str:
        parts = [f"{k} {fmt_bytes(v)}" for k, v in sorted(self._by_kind.items()) if v]
        return ", ".join(parts) or "nothing resident"
