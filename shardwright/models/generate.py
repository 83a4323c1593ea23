"""Greedy generation with a KV cache: the reference every parallel engine is compared with.

Runs in one process (ParallelContext.single()) or, unchanged, on every rank of a TP group with
pp = 1: the gathered logits are identical on all ranks, so every rank picks the same token.
"""

from __future__ import annotations

import torch

from shardwright.models.decoder import DecoderModel


@torch.no_grad()
def greedy_generate(
    model: DecoderModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    stop_ids: list[int] | tuple[int, ...] = (),
) -> list[int]:
    """The `max_new_tokens` greedy continuation of `prompt_ids` (fewer if a stop id appears).

    Prefill runs the whole prompt in one forward pass; each new token is then one decode step
    over the KV cache. Ties in argmax resolve to the lowest id (torch.argmax).
    """
    if model.ctx.pp != 1:
        raise ValueError("greedy_generate runs one pipeline stage; use the engine for pp > 1")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token")
    total = len(prompt_ids) + max_new_tokens
    if total > model.spec.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's max_position_embeddings={model.spec.max_position_embeddings}"
        )
    device = model.ctx.device
    cache = model.new_cache(batch=1, max_tokens=total)
    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device).unsqueeze(0)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.full_logits(model(ids, positions, cache)[:, -1])
        token = int(logits.argmax(dim=-1))
        out.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]], device=device)
        positions = torch.tensor([[cache.length]], device=device)
    return out
