"""A contiguous KV cache for incremental decoding in one process (the reference path).

One tensor pair per local layer, shaped [batch, local_kv_heads, max_tokens, head_dim]. Every row
of the batch has the same length; the paged cache of the serving engine lives in `actors/`.
"""

from __future__ import annotations

import torch


class LayerKV:
    """One layer's slice of the cache; `append` writes at the cache's current length."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache = cache
        self.index = index

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, new_tokens, head_dim]; return all keys and values so far."""
        start, new = self.cache.length, k.shape[2]
        end = start + new
        if end > self.cache.max_tokens:
            raise ValueError(
                f"KV cache holds {self.cache.max_tokens} tokens; appending {new} at {start} "
                "overflows it (raise max_tokens)"
            )
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class KVCache:
    """Keys and values of `num_layers` layers for `batch` sequences of up to `max_tokens`."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_tokens: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, num_kv_heads, max_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_tokens = max_tokens
        self.length = 0

    def layer(self, index: int) -> LayerKV:
        return LayerKV(self, index)

    def advance(self, num_tokens: int) -> None:
        """Mark `num_tokens` more positions as filled (after every layer has appended them)."""
        self.length += num_tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
