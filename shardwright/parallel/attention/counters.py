"""Counting what the context-parallel attention does: ring exchanges, bytes sent, score work.

Tests pass a `CommStats` into `ring_attention` (or `ulysses_attention`, which forwards it to the
ring inside the hybrid); the ring records into it as it runs. `ring_comm_formula` is the promise
the ring keeps, so a test can compare the two (and a patched `torch.distributed` can confirm that
nothing else is sent).

Work is counted, not timed: the causal area of the score blocks a rank computes, per query head,
with a token's score against itself counted as one half. That is flash-attention's FLOP
convention (causal attention costs half of full attention, N^2/2 rather than N(N+1)/2); it makes
a diagonal block of c x c tokens cost exactly c^2/2, so the balance of a split is a ratio of block
counts: max/mean is exactly 1 for the zigzag split and 2 - 1/P for the contiguous split (causal,
equal lengths divisible by 2P).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CommStats:
    """Mutable counters one rank's ring attention adds to (per rank, summed over calls)."""

    forward_calls: int = 0
    backward_calls: int = 0
    kv_exchanges_forward: int = 0
    kv_messages_forward: int = 0
    kv_exchanges_backward: int = 0
    dkv_exchanges_backward: int = 0
    bytes_sent_forward: int = 0
    bytes_sent_backward: int = 0
    work_forward: float = 0.0
    work_backward: float = 0.0

    def add_work(self, phase: str, amount: float) -> None:
        """Add score work (see the module docstring) to `phase` ('forward' or 'backward')."""
        setattr(self, f"work_{phase}", getattr(self, f"work_{phase}") + amount)

    def add_exchange(self, phase: str, kind: str, nbytes: int, new_exchange: bool = True) -> None:
        """Record one message of `kind` ('kv' or 'dkv') that sent `nbytes` from this rank; it
        counts as an exchange (a hop of a shard) when `new_exchange`, i.e. it is the hop's first
        chunk (the forward sends K/V in chunks, see ring.py)."""
        if new_exchange:
            name = f"{kind}_exchanges_{phase}"
            setattr(self, name, getattr(self, name) + 1)
        if phase == "forward":
            self.kv_messages_forward += 1
        setattr(self, f"bytes_sent_{phase}", getattr(self, f"bytes_sent_{phase}") + nbytes)


def causal_area(q_pos: int, q_len: int, k_pos: int, k_len: int, causal: bool) -> float:
    """Score work of query positions [q_pos, q_pos+q_len) against keys [k_pos, k_pos+k_len).

    Non-causal: q_len * k_len. Causal: pairs with key position < query position count 1, equal
    positions count 1/2 (see the module docstring). Exact for any sizes (halves are exact floats).
    """
    if not causal:
        return float(q_len * k_len)
    below = _clamped_sum(q_pos - k_pos + q_len, k_len) - _clamped_sum(q_pos - k_pos, k_len)
    equal = max(0, min(q_pos + q_len, k_pos + k_len) - max(q_pos, k_pos))
    return below + equal / 2


def _clamped_sum(t: int, n: int) -> int:
    """sum over integers 0 <= x < t of min(x, n): keys strictly before each query offset x."""
    if t <= 0:
        return 0
    if t <= n + 1:
        return t * (t - 1) // 2
    return n * (n + 1) // 2 + (t - n - 1) * n


def ring_comm_formula(
    kv_tokens_per_rank: list[int],
    ring_rank: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_chunks: int = 1,
) -> dict[str, int]:
    """What one call of ring attention sends from `ring_rank` (P = len(kv_tokens_per_rank)).

    Forward: P-1 KV exchanges. At hop s a rank sends the K and V block it holds (two tensors
    [T_j, Hkv, D]) that started at rank j = r - s, for s = 0 .. P-2; so it sends every block but
    that of rank r+1:  bytes = sum_{j != r+1} 2 * T_j * Hkv * D * itemsize. Each hop is
    `kv_chunks` messages (the chunks of the block, see ring.py): (P-1) * kv_chunks messages.
    Backward: the same P-1 KV exchanges (same bytes) plus P dKV exchanges: the gradient of each
    block travels with it and makes one last hop home, so a rank sends the dK/dV of every block:
    sum_j 2 * T_j * Hkv * D * grad_itemsize, where gradients are accumulated in float32 for
    16-bit inputs and in the input dtype otherwise. No other collective is issued. With P = 1
    nothing is sent.
    """
    world = len(kv_tokens_per_rank)
    if world == 1:
        return dict.fromkeys(_FORMULA_KEYS, 0)
    per_token = 2 * num_kv_heads * head_dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    grad_itemsize = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    not_sent = kv_tokens_per_rank[(ring_rank + 1) % world]
    kv_bytes = per_token * itemsize * (sum(kv_tokens_per_rank) - not_sent)
    dkv_bytes = per_token * grad_itemsize * sum(kv_tokens_per_rank)
    return {
        "kv_exchanges_forward": world - 1,
        "kv_messages_forward": (world - 1) * kv_chunks,
        "kv_exchanges_backward": world - 1,
        "dkv_exchanges_backward": world,
        "bytes_sent_forward": kv_bytes,
        "bytes_sent_backward": kv_bytes + dkv_bytes,
    }


_FORMULA_KEYS = (
    "kv_exchanges_forward",
    "kv_messages_forward",
    "kv_exchanges_backward",
    "dkv_exchanges_backward",
    "bytes_sent_forward",
    "bytes_sent_backward",
)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit floats (softmax statistics and gradients), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
