"""Blocked KV cache bookkeeping: block allocator, block tables, ref counts, prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots each; a sequence's
``block_table`` lists its blocks in order, so token position p lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

Invariants:
- A block is either referenced (ref_count > 0, in no free list) or free (ref_count == 0,
  in ``_free`` exactly once). ``num_free_blocks + sum of referenced blocks == num_blocks``.
- A full block whose K/V has been computed may carry a content hash
  ``hash((hash of the previous block, its token ids))``. Freed blocks keep their hash and stay
  findable by it until the allocator reuses them; ``_free`` is ordered least recently
  freed first, so cached blocks are evicted LRU.
- Freeing releases a table's blocks last-first, so a shared prefix outlives its suffixes.

The actual K/V tensors live in the runners (layout ``[num_blocks, block_size, num_kv_heads,
head_dim]`` per layer for K and for V); this module is plain Python.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from twinfer.sequence import Sequence

_ROOT_HASH = hash("twinfer-prefix-root")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept with the hash so a hash collision cannot alias


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Content key of a full block: its tokens and, through the parent, every token before."""
    return hash((_ROOT_HASH if parent_hash is None else parent_hash, token_ids))


class BlockManager:
    """Hands out KV blocks to sequences and reuses computed prompt prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.num_prefix_queries = 0  # tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any sequence (cached ones included: they can be evicted)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_block_hashes(self, seq: Sequence) -> None:
        """Extend ``seq.block_hashes`` over every full block of ``seq.token_ids``."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), len(seq.token_ids) // bs):  # known tokens only
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash_block(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding the longest computed prefix of ``seq``'s tokens.

        At least one token is always left to compute, so the step has logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        self.update_block_hashes(seq)
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        found: list[int] = []
        for i, h in enumerate(seq.block_hashes[:max_blocks]):
            block_id = self._cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                    seq.token_ids[i * bs:(i + 1) * bs]):
                break
            found.append(block_id)
        self.num_prefix_queries += seq.num_tokens
        self.num_prefix_hits += len(found) * bs
        return found

    def allocate(self, seq: Sequence, num_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Grow ``seq.block_table`` to hold ``num_tokens`` tokens, first reusing
        ``cached_blocks`` (only when the table is empty). All or nothing: on False nothing
        changed."""
        if cached_blocks and seq.block_table:
            raise ValueError("cached prefix blocks can only start an empty block table")
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_table) - len(cached_blocks)
        # Cached blocks that are free right now leave the free list when we take them.
        num_cached_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if max(num_new, 0) + num_cached_free > len(self._free):
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(num_new):
            seq.block_table.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its cached contents are about to be overwritten
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Publish the full blocks of ``seq`` whose K/V is computed, for later prefix reuse."""
        if not self.enable_prefix_caching:
            return
        self.update_block_hashes(seq)
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(seq.num_published_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            h = seq.block_hashes[i]
            if block.block_hash is not None:
                continue
            if h in self._cached:  # the same content already cached in another block
                continue
            block.block_hash, block.token_ids = h, tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self._cached[h] = block.block_id
        seq.num_published_blocks = max(seq.num_published_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (last block first) and empty its table."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table.clear()
        seq.num_published_blocks = 0
