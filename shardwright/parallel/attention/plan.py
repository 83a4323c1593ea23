"""How a packed batch of sequences is split across the context-parallel (CP) ranks.

A packed batch holds B sequences back to back, [total_tokens, ...], with `cu_seqlens` =
[0, L_0, L_0+L_1, ..., total] (flash-attn's varlen convention). Every sequence is split the same
way:

* `contiguous`: into P chunks, ring rank i holds chunk i.
* `zigzag`: into 2P chunks, ring rank i holds chunks i and 2P-1-i, so with a causal mask every
  rank has the same amount of work (Brandon et al., "Striped Attention"; zhuzilin's
  ring-flash-attention zigzag).

Lengths need not divide by P or 2P: nothing is padded. A sequence of length L cut into n chunks
gets chunks of L // n + 1 tokens for the first L % n chunks and L // n for the rest (some may be
empty), so ranks can hold different numbers of tokens and the ring sends blocks of different
sizes; every rank knows every rank's sizes from the plan, so results stay exact.

Hybrid (Ulysses inside groups of u ranks, ring across the r = cp / u groups): the split above is
made for r ring ranks, and ring rank j's shard is cut again, contiguously in its local order, into
u parts (sizes as above). CP rank c = j * u + i (i < u) holds part i of ring shard j. Pure ring is
u = 1; pure Ulysses is r = 1.

A rank's local tokens are ordered by sequence, then by position: for zigzag, chunk i of sequence 0,
chunk 2P-1-i of sequence 0, chunk i of sequence 1, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Split = Literal["contiguous", "zigzag"]


@dataclass(frozen=True)
class Piece:
    """A run of consecutive positions of one sequence, stored consecutively in a packed tensor."""

    seq: int  # index of the sequence in the batch
    start: int  # row of the first token in the (local) packed tensor
    length: int  # number of tokens
    pos: int  # position of the first token within its sequence


@dataclass(frozen=True)
class ShardPlan:
    """Which tokens every CP rank holds. Build it with `make_shard_plan`; identical on all ranks."""

    cu_seqlens: tuple[int, ...]
    ring_size: int
    ulysses_size: int
    split: Split
    ring_pieces: tuple[tuple[Piece, ...], ...]  # per ring rank, pieces of its ring shard

    @property
    def cp(self) -> int:
        return self.ring_size * self.ulysses_size

    def ring_tokens(self, ring_rank: int) -> int:
        """Number of tokens in ring rank `ring_rank`'s shard (before the Ulysses cut)."""
        return sum(p.length for p in self.ring_pieces[ring_rank])

    def ulysses_sizes(self, ring_rank: int) -> list[int]:
        """Tokens held by each of the u CP ranks that share ring shard `ring_rank`."""
        return even_sizes(self.ring_tokens(ring_rank), self.ulysses_size)

    def num_tokens(self, cp_rank: int) -> int:
        """Number of tokens CP rank `cp_rank` holds."""
        return self.ulysses_sizes(cp_rank // self.ulysses_size)[cp_rank % self.ulysses_size]

    def token_index(self, cp_rank: int) -> torch.Tensor:
        """int64 [num_tokens(cp_rank)]: the packed-batch rows CP rank `cp_rank` holds, in order."""
        self._check_rank(cp_rank)
        ring_rank, part = divmod(cp_rank, self.ulysses_size)
        rows = [
            torch.arange(p.length, dtype=torch.int64) + self.cu_seqlens[p.seq] + p.pos
            for p in self.ring_pieces[ring_rank]
        ]
        index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        sizes = self.ulysses_sizes(ring_rank)
        first = sum(sizes[:part])
        return index[first : first + sizes[part]]

    def positions(self, cp_rank: int) -> torch.Tensor:
        """int64 [num_tokens(cp_rank)]: position within its sequence of each local token (RoPE)."""
        starts = torch.tensor(self.cu_seqlens[:-1], dtype=torch.int64)
        index = self.token_index(cp_rank)
        seq = torch.searchsorted(starts, index, right=True) - 1
        return index - starts[seq]

    def _check_rank(self, cp_rank: int) -> None:
        if not 0 <= cp_rank < self.cp:
            raise ValueError(f"cp_rank={cp_rank} is outside this plan's cp={self.cp}")


def even_sizes(total: int, parts: int) -> list[int]:
    """`total` split into `parts` sizes differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def make_shard_plan(
    cu_seqlens: torch.Tensor | Sequence[int],
    cp: int,
    *,
    split: Split = "zigzag",
    ulysses_size: int = 1,
) -> ShardPlan:
    """Plan the split of a packed batch (int cu_seqlens [B+1]) over `cp` ranks (see module doc)."""
    bounds = seqlen_bounds(cu_seqlens)
    if cp < 1 or ulysses_size < 1 or cp % ulysses_size:
        raise ValueError(
            f"ulysses_size={ulysses_size} must be >= 1 and divide cp={cp} "
            f"(hybrid groups are cp / ulysses_size ring ranks of ulysses_size ranks each)"
        )
    if split not in ("contiguous", "zigzag"):
        raise ValueError(f"split={split!r}: choose 'contiguous' or 'zigzag'")
    ring_size = cp // ulysses_size
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    pieces = tuple(_ring_shard(lengths, ring_size, r, split) for r in range(ring_size))
    return ShardPlan(tuple(bounds), ring_size, ulysses_size, split, pieces)


def seqlen_bounds(cu_seqlens: torch.Tensor | Sequence[int]) -> list[int]:
    """cu_seqlens as a list of ints, checked to start at 0 and never decrease."""
    values = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
    bounds = [int(x) for x in values]
    if len(bounds) < 2 or bounds[0] != 0 or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(
            "cu_seqlens must start at 0 and never decrease (cumulative sequence starts), "
            f"got {bounds}"
        )
    return bounds


def _ring_shard(lengths: list[int], world: int, rank: int, split: Split) -> tuple[Piece, ...]:
    chunks = [rank] if split == "contiguous" else [rank, 2 * world - 1 - rank]
    num_chunks = world if split == "contiguous" else 2 * world
    pieces, start = [], 0
    for seq, length in enumerate(lengths):
        sizes = even_sizes(length, num_chunks)
        for chunk in chunks:
            pieces.append(Piece(seq, start, sizes[chunk], sum(sizes[:chunk])))
            start += sizes[chunk]
    return tuple(p for p in pieces if p.length)


def shard_tokens(x: torch.Tensor, plan: ShardPlan, cp_rank: int, dim: int = 0) -> torch.Tensor:
    """The rows of packed `x` (tokens along `dim`) that CP rank `cp_rank` holds."""
    return x.index_select(dim, plan.token_index(cp_rank).to(x.device))


def unshard_tokens(parts: Sequence[torch.Tensor], plan: ShardPlan, dim: int = 0) -> torch.Tensor:
    """Inverse of `shard_tokens`: `parts[c]` is CP rank c's shard; returns the packed batch."""
    if len(parts) != plan.cp:
        raise ValueError(
            f"unshard_tokens needs one part per CP rank: got {len(parts)}, cp={plan.cp}"
        )
    index = torch.cat([plan.token_index(c) for c in range(plan.cp)]).to(parts[0].device)
    stacked = torch.cat(list(parts), dim=dim)
    return torch.empty_like(stacked).index_copy_(dim, index, stacked)
