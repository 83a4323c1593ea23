"""The prefix cache of the paged KV cache: full blocks found again by the tokens they hold.

A full block's key is `block_hash(parent, tokens)`: a 128-bit BLAKE2b digest of its
predecessor's key and its own `block_size` token ids, so a key names the whole token prefix up
to the block's end, and with it the block's keys and values (K/V at a position depend only on
the tokens up to it; nothing else changes them in this engine: one model, one dtype, no
adapters). Two sequences whose prompts start with the same full blocks can therefore share
those blocks.

`PrefixCache` maps keys to block ids and keeps the cached blocks that no sequence holds (idle)
in least-recently-used order; `BlockManager` (kv_blocks.py) owns the reference counts and
decides when a block is held, released, or evicted to be reused.

Guarantees:
- a key maps to at most one block and a block holds at most one key;
- `match` returns the longest chain of cached blocks for a list of keys, in order;
- `evict` returns the idle block released longest ago (or None) and forgets its key;
- idle blocks are exactly the cached blocks released and not held since.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

ROOT = b""  # the parent key of a sequence's first block


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block holding `tokens` after the block whose key is `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of the full blocks of `token_ids` (len(token_ids) // block_size of them), in order."""
    keys, parent = [], ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size])
        keys.append(parent)
    return keys


class PrefixCache:
    """Key -> block map of the cached full blocks, and the LRU order of the idle ones."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self.num_evictions = 0

    @property
    def num_cached(self) -> int:
        """Blocks holding a key (held by sequences or idle)."""
        return len(self._key_of)

    @property
    def num_idle(self) -> int:
        """Cached blocks no sequence holds: free to be found again, or evicted."""
        return len(self._idle)

    def key_of(self, block: int) -> bytes | None:
        return self._key_of.get(block)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of `keys`."""
        out = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def insert(self, block: int, key: bytes) -> bool:
        """Cache `block` (held by a sequence) under `key`; False if the key is already cached
        (by another block, which stays the one found) or the block already holds a key."""
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def hold(self, block: int) -> None:
        """A sequence holds `block` again: it is no longer idle (evictable)."""
        self._idle.pop(block, None)

    def release(self, block: int) -> bool:
        """The last holder let `block` go: idle (most recently used) if cached; False if not."""
        if block not in self._key_of:
            return False
        self._idle[block] = None
        return True

    def evict(self) -> int | None:
        """The least recently released idle block, its key forgotten; None if none is idle."""
        if not self._idle:
            return None
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self.num_evictions += 1
        return block
