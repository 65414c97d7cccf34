"""Block bookkeeping: allocation, sharing, copy-on-write, publication
under chain hashes, LRU eviction."""

import torch

from nanoseek.engine.cache import BlockManager, LatentCache, chain_hash


class Seq:
    def __init__(self, tokens):
        self.token_ids = list(tokens)
        self.num_computed = 0
        self.block_table = []
        self.block_hashes = []


def prefilled(bm: BlockManager, tokens) -> Seq:
    """A sequence allocated in `bm` with every token computed and its full
    blocks published, as after a prefill."""
    s = Seq(tokens)
    bm.allocate(s)
    s.num_computed = len(s.token_ids)
    bm.publish(s)
    return s


def test_allocation_is_all_or_nothing_and_freeing_returns_everything():
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_cache=False)
    a, b = Seq(range(10)), Seq(range(100, 110))  # 3 blocks each
    assert bm.allocate(a) and len(a.block_table) == 3 and bm.num_free == 2
    assert not bm.allocate(b) and b.block_table == [] and bm.num_free == 2
    bm.free_sequence(a)
    assert bm.num_free == 5 and bm.allocate(b)


def test_ensure_slots_grows_the_table_and_reports_a_short_pool():
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_cache=False)
    s = Seq(range(8))
    assert bm.allocate(s) and len(s.block_table) == 2
    s.num_computed = 8
    # positions 8, 9 need a third block
    assert bm.ensure_slots(s, 2) == [] and len(s.block_table) == 3
    s.num_computed = 12
    # no fourth block: nothing changes
    assert bm.ensure_slots(s, 1) is None and len(s.block_table) == 3


def test_forked_siblings_share_full_blocks_and_copy_the_partial_one_on_write():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_cache=False)
    parent = Seq(range(10))
    bm.allocate(parent)
    parent.num_computed = 10
    child = Seq(range(10))
    child.num_computed = 10
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and bm.ref[parent.block_table[0]] == 2
    copies = bm.ensure_slots(child, 1)  # position 10 lies in the shared partial block 2
    assert (
        len(copies) == 1
        and copies[0][0] == parent.block_table[2]
        and copies[0][1] == child.block_table[2]
    )
    assert (
        child.block_table[:2] == parent.block_table[:2]
        and child.block_table[2] != parent.block_table[2]
    )
    assert bm.ensure_slots(parent, 1) == []  # the parent owns its partial block alone now
    bm.free_sequence(parent)
    bm.free_sequence(child)
    assert bm.num_free == 8 and all(r == 0 for r in bm.ref)


def test_copy_blocks_moves_every_layer():
    cache = LatentCache(
        num_layers=2,
        num_blocks=3,
        block_size=2,
        kv_rank=3,
        rope_dim=2,
        dtype=torch.float32,
        device="cpu",
    )
    cache.kv.normal_()
    before = cache.kv.clone()
    cache.copy_blocks([(0, 2)])
    assert torch.equal(cache.kv[:, 4:6], before[:, 0:2]) and torch.equal(
        cache.kv[:, :4], before[:, :4]
    )


def test_published_blocks_are_found_by_their_whole_prefix():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = prefilled(bm, range(13))
    assert len(bm.published) == 3  # three full blocks
    same = Seq(list(range(12)) + [99, 98])
    assert (
        bm.allocate(same) and same.num_computed == 12 and same.block_table[:3] == a.block_table[:3]
    )
    # the same block of tokens after a different prefix is a different block
    shifted = Seq([50] * 4 + list(range(4, 13)))
    assert bm.allocate(shifted) and shifted.num_computed == 0
    assert chain_hash(b"", [1, 2]) != chain_hash(b"", [2, 1]) and chain_hash(
        b"x", [1]
    ) != chain_hash(b"", [1])


def test_a_prompt_never_hits_its_own_last_token_and_lookahead_delays_publication():
    bm = BlockManager(num_blocks=10, block_size=4)
    prefilled(bm, range(8))
    again = Seq(range(8))
    # the second block holds the last prompt token
    assert bm.allocate(again) and again.num_computed == 4

    mtp = BlockManager(num_blocks=10, block_size=4, lookahead=1)
    b = prefilled(mtp, range(8))
    assert len(mtp.published) == 1  # block 2 waits for token 8, which its MTP entries depend on
    b.token_ids.append(8)
    mtp.publish(b)
    assert len(mtp.published) == 2


def test_unreferenced_published_blocks_are_evicted_oldest_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    first_blocks = []
    for tokens in ([1, 2, 3], [7, 8, 9]):
        s = prefilled(bm, tokens)
        first_blocks.append(s.block_table[0])
        bm.free_sequence(s)
    assert len(bm.evictable) == 2 and bm.num_free == 4
    # three blocks: the two free ones and a's (the older) published block
    c = Seq([20, 21, 22, 23, 24, 25])
    assert bm.allocate(c) and bm.num_free == 1 and list(bm.evictable) == [first_blocks[1]]
    bm.free_sequence(c)
    hit_b = Seq([7, 8, 9])
    assert bm.allocate(hit_b) and hit_b.num_computed == 2
    miss_a = Seq([1, 2, 3])
    assert bm.allocate(miss_a) and miss_a.num_computed == 0


def test_forgotten_prefixes_are_never_found_and_their_free_blocks_return():
    """forget_prefixes (a weight change): no published block is found again; unreferenced ones
    are free, held ones stay with their sequence and are freed plainly."""
    bm = BlockManager(num_blocks=6, block_size=4)
    held = prefilled(bm, range(9))  # two full blocks published, still held
    done = prefilled(bm, range(100, 109))
    bm.free_sequence(done)  # its two full blocks: published, unreferenced
    assert len(bm.evictable) == 2 and len(bm.published) == 4
    bm.forget_prefixes()
    assert not bm.published and not bm.evictable and bm.num_free == 3
    again = Seq(range(100, 109))
    assert bm.allocate(again) and again.num_computed == 0  # no hit
    bm.free_sequence(held)
    bm.free_sequence(again)
    assert bm.num_free == 6 and len(set(bm.free)) == 6
