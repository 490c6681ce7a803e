"""BlockManager: allocation, ref counts, prefix caching and LRU eviction.

The property test drives random allocate / append / share-by-prefix / free / preempt
sequences and checks after every operation that no block leaks or is freed twice.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from twinfer.kv_cache import BlockManager
from twinfer.sampling import SamplingParams
from twinfer.sequence import Sequence

BS = 4


def seq(tokens, rid="r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """Pretend the runner computed the first n tokens, and publish them."""
    s.num_computed_tokens = n
    bm.cache_computed_blocks(s)


def test_allocate_takes_ceil_tokens_over_block_size_blocks():
    bm = BlockManager(10, BS)
    s = seq(range(9))
    assert bm.allocate(s, 9)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7


def test_allocate_is_all_or_nothing():
    bm = BlockManager(2, BS)
    s = seq(range(12))
    assert not bm.allocate(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_finished_prompt_blocks_are_reused_by_a_new_request():
    bm = BlockManager(10, BS)
    a = seq(range(10), "a")
    bm.allocate(a, 10)
    compute(bm, a, 10)
    bm.free(a)
    b = seq(list(range(10)) + [99], "b")
    cached = bm.find_cached_prefix(b)
    assert cached == a.block_table[:0] + cached and len(cached) == 2  # two full blocks
    assert bm.allocate(b, b.num_tokens, cached)
    assert b.block_table[:2] == cached


def test_prefix_lookup_leaves_the_last_token_to_compute():
    bm = BlockManager(10, BS)
    a = seq(range(8), "a")
    bm.allocate(a, 8)
    compute(bm, a, 8)
    assert len(bm.find_cached_prefix(seq(range(8), "b"))) == 1  # not 2: one token must run


def test_shared_block_has_ref_count_of_its_users():
    bm = BlockManager(10, BS)
    a = seq(range(8), "a")
    bm.allocate(a, 8)
    compute(bm, a, 8)
    b = seq(list(range(4)) + [7, 7, 7], "b")
    cached = bm.find_cached_prefix(b)
    bm.allocate(b, b.num_tokens, cached)
    assert bm.blocks[cached[0]].ref_count == 2
    bm.free(a)
    assert bm.blocks[cached[0]].ref_count == 1


def test_eviction_is_least_recently_freed_first():
    bm = BlockManager(3, BS)
    old, new = seq(range(4), "old"), seq(range(10, 14), "new")
    for s in (old, new):
        bm.allocate(s, 4)
        compute(bm, s, 4)
        bm.free(s)
    filler = seq(range(100, 104), "filler")
    bm.allocate(filler, 8)  # takes the never-used block, then evicts the oldest cached one
    assert bm.find_cached_prefix(seq(list(range(4)) + [1], "x")) == []
    assert len(bm.find_cached_prefix(seq(list(range(10, 14)) + [1], "y"))) == 1


def test_different_tokens_do_not_hit():
    bm = BlockManager(10, BS)
    a = seq(range(8), "a")
    bm.allocate(a, 8)
    compute(bm, a, 8)
    assert bm.find_cached_prefix(seq([0, 1, 2, 9, 4, 5, 6, 7, 8], "b")) == []


def test_prefix_caching_off_never_hits():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = seq(range(8), "a")
    bm.allocate(a, 8)
    compute(bm, a, 8)
    bm.free(a)
    assert bm.find_cached_prefix(seq(range(9), "b")) == []


ops = st.lists(st.tuples(st.sampled_from(["new", "append", "free", "preempt"]),
                         st.integers(0, 7), st.integers(1, 12)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=ops, num_blocks=st.integers(4, 24))
def test_random_operations_never_leak_or_double_free(ops, num_blocks):
    bm = BlockManager(num_blocks, BS)
    live: dict[int, Sequence] = {}
    prefixes = [list(range(12)), list(range(50, 58))]  # shared prefixes make cache hits likely
    for op, slot, n in ops:
        s = live.get(slot)
        if op == "new" and s is None:
            s = seq(prefixes[slot % 2][: n] + [200 + slot] * n, f"s{slot}")
            cached = bm.find_cached_prefix(s)
            if bm.allocate(s, s.num_tokens, cached):
                compute(bm, s, s.num_tokens)
                live[slot] = s
        elif op == "append" and s is not None:
            s.token_ids += [300 + slot] * n
            if bm.allocate(s, s.num_tokens):
                compute(bm, s, s.num_tokens)
            else:
                s.token_ids = s.token_ids[:-n]
        elif op in ("free", "preempt") and s is not None:
            bm.free(s)
            del live[slot]
        check_invariants(bm, live.values())
    for s in list(live.values()):
        bm.free(s)
    assert bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def check_invariants(bm: BlockManager, seqs) -> None:
    refs = [0] * bm.num_blocks
    for s in seqs:
        assert len(s.block_table) == bm.num_blocks_for(s.num_tokens)
        assert len(set(s.block_table)) == len(s.block_table)
        for i, b in enumerate(s.block_table):
            refs[b] += 1
            block = bm.blocks[b]
            if block.block_hash is not None:  # a shared block holds exactly this seq's tokens
                assert block.token_ids == tuple(s.token_ids[i * BS:(i + 1) * BS])
    assert refs == [b.ref_count for b in bm.blocks]
    free = [i for i, r in enumerate(refs) if r == 0]
    assert sorted(bm._free) == free  # free exactly when unreferenced, listed once
    for h, block_id in bm._cached.items():  # every cached hash points at its own block
        assert bm.blocks[block_id].block_hash == h
