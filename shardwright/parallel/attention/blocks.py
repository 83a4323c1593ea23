"""Tiled attention kernels over pieces of packed sequences (flash-attention's algorithm in torch).

Queries and keys are given as `Piece`s: runs of consecutive positions of one sequence. A query
piece attends to every key piece of the same sequence; with `causal`, a query at position p sees
keys at positions <= p. Work is done in tiles of at most `block_size` x `block_size` tokens, tiles
wholly above the causal diagonal are skipped, and the forward pass keeps flash-attention's online
softmax (running max, running sum), so no score matrix larger than one tile per head ever exists.
The backward pass recomputes each tile's probabilities from the saved log-sum-exp
(FlashAttention-2, Algorithm 2).

Shapes: q [Tq, H, D], k and v [Tk, Hkv, D], Hkv divides H and query head h reads kv head
h // (H / Hkv) (grouped-query attention). lse and delta are [H, Tq]. Statistics and gradients are
accumulated in float32 for 16-bit inputs, in the input dtype otherwise; results come back in that
accumulation dtype for the caller to merge or cast.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from shardwright.parallel.attention.counters import CommStats, accumulation_dtype, causal_area
from shardwright.parallel.attention.merge import merge_attention_
from shardwright.parallel.attention.plan import Piece

Tile = tuple[slice, int]  # rows in the packed tensor, position of the first row
# Query heads whose score tiles the forward computes at once (at least one kv head's group): the
# score buffer is SCORE_TILE_HEADS x block_size^2, 1 MiB at tiles of 256 in fp32. Larger batches
# save little time (the matmuls are already large) and add to every rank's peak memory.
SCORE_TILE_HEADS = 4


def forward_pieces(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pieces: Sequence[Piece],
    k_pieces: Sequence[Piece],
    *,
    causal: bool,
    scale: float,
    block_size: int,
    stats: CommStats | None = None,
    into: tuple[torch.Tensor, torch.Tensor] | None = None,
    workspace: ForwardWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q_pieces` over `k_pieces`: (out [Tq, H, D], lse [H, Tq]), accumulation dtype.

    Rows of q in no piece, or that see no key, get out 0 and lse -inf.
    `into`: a running (out, lse) result over other keys (accumulation dtype); each query tile's
    result is merged into it in place with `merge_attention_` and `into` is returned, so the
    caller never holds a second full-size output (ring attention's steps). Rows of q in no piece
    are left as they are. `workspace`: the tile buffers to use (a `ForwardWorkspace` for this q,
    kept by a caller that makes many calls, such as ring attention's steps); made if None.
    """
    _check_block_size(block_size)
    acc = accumulation_dtype(q.dtype)
    num_tokens, heads, dim = q.shape
    if into is None:
        out = torch.zeros(num_tokens, heads, dim, dtype=acc, device=q.device)
        lse = torch.full((heads, num_tokens), float("-inf"), dtype=acc, device=q.device)
    else:
        out, lse = into
        _check_into(out, lse, (num_tokens, heads, dim), acc)
    keys_of = _by_sequence(k_pieces)
    work = workspace or ForwardWorkspace(q, k.shape[1], block_size, acc)
    for qp in q_pieces:
        keys = keys_of.get(qp.seq, [])
        if stats is not None:
            stats.add_work("forward", heads * _area(qp, keys, causal))
        for rows, pos in _tiles(qp, block_size):
            key_tiles = list(_key_tiles(keys, pos, rows.stop - rows.start, causal, block_size))
            if into is not None and not key_tiles:
                continue  # merging an empty part is the identity: skip the tile
            tile_lse = work.tile(q[rows], pos, k, v, key_tiles, causal, scale)
            if into is None:
                out[rows] = work.tile_out()
                lse[:, rows] = tile_lse
            else:
                merge_attention_(out[rows], lse[:, rows], work.tile_out(), tile_lse,
                                 part_finite=True)
    return out, lse


def _check_into(out: torch.Tensor, lse: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if tuple(out.shape) != shape or tuple(lse.shape) != (shape[1], shape[0]) or (
        out.dtype != dtype or lse.dtype != dtype
    ):
        raise ValueError(
            f"into must be (out {shape}, lse {(shape[1], shape[0])}) in {dtype}, got "
            f"{tuple(out.shape)} {out.dtype} and {tuple(lse.shape)} {lse.dtype}"
        )


class ForwardWorkspace:
    """The buffers of `forward_pieces`, reused by every query tile and key tile (and call).

    A query tile of m rows is held grouped by kv head, [Hkv, g*m, D] (row i*m + t is query head
    kv_head*g + i at token t), pre-multiplied by the softmax scale, so one batched matmul per key
    tile gives the scores of SCORE_TILE_HEADS query heads (whole kv-head groups) straight into the
    score buffer, and the probabilities times V are added into the running accumulator in place
    (baddbmm). Nothing tile-sized is allocated per tile: the allocator never churns, and the peak
    is the buffers below (tiles of 256, fp32, 8 heads: 1 MiB of scores, 0.5 MiB each for q and
    the accumulator, which also serves as the tile's output) plus [H, m]-sized statistics.
    """

    def __init__(self, q: torch.Tensor, kv_heads: int, block_size: int, dtype: torch.dtype):
        self.kv_heads, self.heads, self.dim = kv_heads, q.shape[1], q.shape[2]
        self.group = self.heads // kv_heads
        rows = min(block_size, q.shape[0]) * self.heads
        # kv heads per score matmul: enough for a full tile of SCORE_TILE_HEADS query heads
        self.heads_per_pass = max(1, min(kv_heads, SCORE_TILE_HEADS // self.group))
        new = {"dtype": dtype, "device": q.device}
        self._q = torch.empty(rows * self.dim, **new)
        self._acc = torch.empty(rows * self.dim, **new)
        self._scores = torch.empty(self.heads_per_pass * self.group * block_size**2, **new)
        self.m = 0

    def tile(self, q_rows, q_pos, k, v, key_tiles, causal, scale) -> torch.Tensor:
        """Online softmax of one query tile over `key_tiles`; keeps its unnormalised output and
        returns its lse [H, m] (-inf, with output 0, for a row that sees no key)."""
        m, hkv, g, d = q_rows.shape[0], self.kv_heads, self.group, self.dim
        self.m = m
        qs = self._q[: hkv * g * m * d].view(hkv, g * m, d)
        qs.view(hkv, g, m, d).copy_(q_rows.reshape(m, hkv, g, d).permute(1, 2, 0, 3)).mul_(scale)
        acc = self._acc[: hkv * g * m * d].view(hkv, g * m, d).zero_()
        run_max = torch.full((hkv, g * m), float("-inf"), dtype=qs.dtype, device=qs.device)
        run_sum = torch.zeros_like(run_max)
        mask = {}  # causal masks [m, n] by key tile, shared by the head passes
        for h0 in range(0, hkv, self.heads_per_pass):
            heads = slice(h0, min(hkv, h0 + self.heads_per_pass))
            self._pass(qs[heads], acc[heads], run_max[heads], run_sum[heads], k[:, heads],
                       v[:, heads], q_pos, key_tiles, causal, mask)
        seen = run_sum > 0
        total = run_sum.masked_fill_(~seen, 1.0)
        acc.div_(total.unsqueeze(-1))
        lse = torch.where(seen, run_max + torch.log(total), float("-inf"))
        return lse.view(hkv * g, m)

    def _pass(self, qs, acc, run_max, run_sum, k, v, q_pos, key_tiles, causal, mask) -> None:
        """The online softmax of some kv heads' query rows over every key tile, in place."""
        hb, rows_q, g = qs.shape[0], qs.shape[1], self.group
        m = rows_q // g
        for rows, k_pos in key_tiles:
            n = rows.stop - rows.start
            scores = self._scores[: hb * rows_q * n].view(hb, rows_q, n)
            torch.bmm(qs, k[rows].to(qs.dtype).permute(1, 2, 0), out=scores)
            if causal and k_pos + n - 1 > q_pos:
                if k_pos not in mask:
                    qi = torch.arange(q_pos, q_pos + m, device=qs.device).unsqueeze(1)
                    ki = torch.arange(k_pos, k_pos + n, device=qs.device).unsqueeze(0)
                    mask[k_pos] = ki > qi
                scores.view(hb, g, m, n).masked_fill_(mask[k_pos], float("-inf"))
            new_max = torch.maximum(run_max, scores.amax(dim=-1))
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
            probs = scores.sub_(shift.unsqueeze(-1)).exp_()  # in place: exactly 0 where masked
            decay = (run_max - shift).exp_()
            run_sum.mul_(decay).add_(probs.sum(dim=-1))
            acc.mul_(decay.unsqueeze(-1)).baddbmm_(probs, v[rows].to(qs.dtype).permute(1, 0, 2))
            run_max.copy_(new_max)

    def tile_out(self) -> torch.Tensor:
        """The last tile's output as an [m, H, D] view of the accumulator (0 where no key)."""
        m, hkv, g, d = self.m, self.kv_heads, self.group, self.dim
        acc = self._acc[: hkv * g * m * d].view(hkv, g, m, d)
        return acc.permute(2, 0, 1, 3).view(m, hkv * g, d)  # head h = kv_head * g + i


def backward_pieces(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_pieces: Sequence[Piece],
    k_pieces: Sequence[Piece],
    *,
    causal: bool,
    scale: float,
    block_size: int,
    stats: CommStats | None = None,
    dq_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of this block of attention: (dq [Tq, H, D], dk, dv [Tk, Hkv, D]).

    `lse` [H, Tq] is the log-sum-exp over ALL keys (the final one, not this block's) and `delta`
    [H, Tq] = rowsum(dout * out) - dlse, so that the block gradients of a split key set add up to
    the full gradient. `dq_into`: a running dq (accumulation dtype) this block's dq is added to in
    place and returned as dq (ring attention sums dq over its steps this way).
    """
    _check_block_size(block_size)
    acc = accumulation_dtype(q.dtype)
    kv_heads = k.shape[1]
    if dq_into is not None and (dq_into.shape != q.shape or dq_into.dtype != acc):
        raise ValueError(f"dq_into must be {tuple(q.shape)} in {acc}, got "
                         f"{tuple(dq_into.shape)} {dq_into.dtype}")
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if dq_into is None else dq_into
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    keys_of = _by_sequence(k_pieces)
    for qp in q_pieces:
        keys = keys_of.get(qp.seq, [])
        if stats is not None:
            stats.add_work("backward", q.shape[1] * _area(qp, keys, causal))
        for rows, pos in _tiles(qp, block_size):
            tile = _TileGrad(
                _grouped(q[rows], kv_heads, acc),
                _grouped(dout[rows], kv_heads, acc),
                _grouped_stat(lse[:, rows].to(acc), kv_heads),
                _grouped_stat(delta[:, rows].to(acc), kv_heads),
            )
            tile.run(pos, k, v, keys, dk, dv, causal, scale, block_size)
            dq[rows] += tile.dq.reshape(dq[rows].shape)
    return dq, dk, dv


class _TileGrad:
    """Backward of one query tile against all its key tiles (recomputing probabilities)."""

    def __init__(self, qt, dot, lse, delta):
        self.qt, self.dot, self.delta = qt, dot, delta
        self.lse = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
        self.dq = torch.zeros_like(qt)

    def run(self, q_pos, k, v, keys, dk, dv, causal, scale, block_size) -> None:
        qt, dot = self.qt, self.dot
        for rows, k_pos in _key_tiles(keys, q_pos, qt.shape[0], causal, block_size):
            kt, vt = k[rows].to(qt.dtype), v[rows].to(qt.dtype)
            probs = _scores(qt, kt, scale, q_pos, k_pos, causal)
            probs = probs.sub_(self.lse.unsqueeze(-1)).exp_()  # in place: fewer tiles alive
            dv[rows] += torch.einsum("hgqk,qhgd->khd", probs, dot)
            dprobs = torch.einsum("qhgd,khd->hgqk", dot, vt)
            dscores = dprobs.sub_(self.delta.unsqueeze(-1)).mul_(probs).mul_(scale)
            self.dq += torch.einsum("hgqk,khd->qhgd", dscores, kt)
            dk[rows] += torch.einsum("hgqk,qhgd->khd", dscores, qt)


def _scores(qt, kt, scale, q_pos, k_pos, causal) -> torch.Tensor:
    """Scaled scores [Hkv, g, m, n] of a query tile against a key tile, -inf above the diagonal."""
    scores = torch.einsum("qhgd,khd->hgqk", qt, kt).mul_(scale)  # in place: a fresh tile
    m, n = qt.shape[0], kt.shape[0]
    if causal and k_pos + n - 1 > q_pos:
        qi = torch.arange(q_pos, q_pos + m, device=qt.device).unsqueeze(1)
        ki = torch.arange(k_pos, k_pos + n, device=qt.device).unsqueeze(0)
        scores = scores.masked_fill_(ki > qi, float("-inf"))
    return scores


def _grouped(x: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[m, H, D] -> [m, Hkv, g, D] in `dtype`: query heads grouped by the kv head they read."""
    return x.to(dtype).reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, x.shape[2])


def _grouped_stat(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[H, m] -> [Hkv, g, m]."""
    return x.reshape(kv_heads, x.shape[0] // kv_heads, x.shape[1])


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1 (tokens per tile, e.g. 256)")


def _by_sequence(pieces: Sequence[Piece]) -> dict[int, list[Piece]]:
    grouped: dict[int, list[Piece]] = {}
    for piece in pieces:
        grouped.setdefault(piece.seq, []).append(piece)
    return grouped


def _area(qp: Piece, keys: list[Piece], causal: bool) -> float:
    return sum(causal_area(qp.pos, qp.length, kp.pos, kp.length, causal) for kp in keys)


def _tiles(piece: Piece, block_size: int) -> Iterator[Tile]:
    """Row slices of at most `block_size` tokens covering `piece`, with their first positions."""
    for offset in range(0, piece.length, block_size):
        size = min(block_size, piece.length - offset)
        yield slice(piece.start + offset, piece.start + offset + size), piece.pos + offset


def _key_tiles(keys, q_pos: int, q_len: int, causal: bool, block_size: int) -> Iterator[Tile]:
    """Key tiles a query tile at [q_pos, q_pos+q_len) can see (all of them unless causal)."""
    for kp in keys:
        for rows, k_pos in _tiles(kp, block_size):
            if not causal or k_pos <= q_pos + q_len - 1:
                yield rows, k_pos
