"""Radix prefix cache: matching, splitting, page alignment, locking, LRU eviction, adoption of pages."""
import random

import pytest

from dsserve.core.kv_cache import PageAllocator
from dsserve.core.radix_cache import RadixCache


def make(num_pages=64, page_size=4, enabled=True):
    alloc = PageAllocator(num_pages, page_size)
    return alloc, RadixCache(alloc, page_size, enabled)


def tree_nodes(cache):
    stack = [cache._root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def check_tree(cache):
    """Structural invariants, and the O(1) counters agree with a full walk."""
    pages, evictable = [], 0
    for node in tree_nodes(cache):
        if node is cache._root:
            continue
        assert node.pages and len(node.key) == len(node.pages) * cache.page_size
        assert node.parent.children[node.key[:cache.page_size]] is node
        assert node.lock_ref >= 0 and node.lock_ref >= max((c.lock_ref for c in node.children.values()), default=0)
        pages += node.pages
        evictable += len(node.pages) if node.lock_ref == 0 else 0
    assert len(pages) == len(set(pages)) and 0 not in pages
    assert cache.cached_pages == len(pages) and cache.evictable_pages == evictable
    return set(pages)


def seq(alloc, cache, tokens):
    """Simulate a request that reuses what is cached, computes the rest into new pages, and finishes."""
    m = cache.match_prefix(tokens)
    pages = m.pages + alloc.alloc(len(tokens) // cache.page_size - len(m.pages))
    assert cache.insert(tokens, pages) == []
    return pages


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_insert_then_match_is_page_aligned(page_size):
    alloc, cache = make(page_size=page_size)
    tokens = list(range(100, 100 + 4 * page_size))
    pages = seq(alloc, cache, tokens)
    m = cache.match_prefix(tokens)
    assert (m.pages, m.num_tokens) == (pages, len(tokens))
    m = cache.match_prefix(tokens + [7, 8, 9])                           # longer query: whole match
    assert m.pages == pages
    m = cache.match_prefix(tokens[:2 * page_size + page_size // 2])      # partial page never matches
    assert (m.pages, m.num_tokens) == (pages[:2], 2 * page_size)
    mid = tokens[:page_size + page_size // 2] + [0] + tokens[page_size + page_size // 2 + 1:]
    m = cache.match_prefix(mid)                                          # mismatch inside page 1
    assert (m.pages, m.num_tokens) == (pages[:1], page_size)
    assert cache.match_prefix([1] * page_size).num_tokens == 0
    assert cache.match_prefix(tokens[:page_size - 1]).pages == []
    assert cache.peek_prefix_len(mid) == page_size and cache.peek_prefix_len(tokens + [1]) == len(tokens)
    check_tree(cache)


def test_split_on_partial_match_keeps_the_handle_and_counts():
    alloc, cache = make()
    tokens = list(range(24))
    pages = seq(alloc, cache, tokens)
    full = cache.match_prefix(tokens)
    cache.lock(full.node)
    assert cache.evictable_pages == 0
    part = cache.match_prefix(tokens[:10])                      # ends inside the node: split after page 2
    assert part.pages == pages[:2] and part.node is not full.node
    assert full.node.parent is part.node and part.node.lock_ref == 1    # inherited the lock
    assert len(full.node.pages) == 4 and cache.cached_pages == 6
    check_tree(cache)
    cache.unlock(full.node)                                     # walks the new parent too
    assert part.node.lock_ref == 0 and cache.evictable_pages == 6
    check_tree(cache)


def test_split_on_insert_of_a_diverging_sequence():
    alloc, cache = make()
    a = list(range(16))
    b = a[:8] + [99] * 8
    pa = seq(alloc, cache, a)
    pb = alloc.alloc(4)
    assert cache.insert(b, pb) == pb[:2]                        # shared first two pages are duplicates
    root_child = next(iter(cache._root.children.values()))
    assert root_child.pages == pa[:2] and len(root_child.children) == 2
    assert cache.match_prefix(b).pages == pa[:2] + pb[2:]
    assert cache.match_prefix(a).pages == pa
    alloc.free(pb[:2])
    check_tree(cache)


def test_insert_with_pages_from_match_returns_nothing():
    alloc, cache = make()
    prompt = list(range(12))
    pages = seq(alloc, cache, prompt)
    m = cache.match_prefix(prompt + [50, 51, 52, 53, 54])
    cache.lock(m.node)
    own = alloc.alloc(1)
    assert cache.insert(prompt + [50, 51, 52, 53], m.pages + own) == []
    cache.unlock(m.node)
    assert cache.match_prefix(prompt + [50, 51, 52, 53]).pages == pages + own
    assert cache.cached_pages == 4
    check_tree(cache)


def test_insert_of_cached_tokens_under_other_pages_returns_exactly_those():
    alloc, cache = make()
    tokens = list(range(20))
    pages = seq(alloc, cache, tokens[:12])
    mine = alloc.alloc(5)
    mixed = pages[:1] + mine[1:]                                # page 0 shared, pages 1-2 duplicated, 3-4 new
    assert cache.insert(tokens, mixed) == mine[1:3]
    assert cache.match_prefix(tokens).pages == pages + mine[3:]
    check_tree(cache)


def test_lock_protects_from_eviction():
    alloc, cache = make()
    seq(alloc, cache, list(range(8)))
    seq(alloc, cache, list(range(100, 112)))
    m = cache.match_prefix(list(range(100, 112)))
    cache.lock(m.node)
    assert cache.evictable_pages == 2
    assert cache.evict(10) == 2                                 # less than asked: the rest is locked
    assert cache.cached_pages == 3 and cache.match_prefix(list(range(100, 112))).pages == m.pages
    assert cache.evict(1) == 0
    cache.unlock(m.node)
    assert cache.evict(1) == 3                                  # a leaf goes whole
    assert cache.cached_pages == 0 and alloc.num_free == 63


def test_eviction_is_lru_among_leaves_and_parents_follow_children():
    alloc, cache = make()
    base = list(range(8))
    seq(alloc, cache, base)
    pa = seq(alloc, cache, base + [1] * 4)[-1:]
    pb = seq(alloc, cache, base + [2] * 4)[-1:]
    pc = seq(alloc, cache, [9] * 4)
    cache.match_prefix(base + [1] * 4)                          # a now recent; order b, c, a
    free0 = alloc.num_free
    assert cache.evict(1) == 1 and alloc._free[-1] == pb[0]
    assert cache.evict(1) == 1 and alloc._free[-1] == pc[0]
    assert cache.evict(1) == 1 and alloc._free[-1] == pa[0]
    assert cache.match_prefix(base + [1] * 4).num_tokens == 8   # the parent is still there ...
    assert cache.evict(1) == 2                                  # ... and went once it became a leaf
    assert alloc.num_free == free0 + 5 and cache.cached_pages == 0
    seq(alloc, cache, base)                                     # one call: the leaf, then its parent
    seq(alloc, cache, base + [3] * 4)
    seq(alloc, cache, [8] * 4)
    cache.match_prefix([8] * 4)
    assert cache.evict(2) == 3 and cache.cached_pages == 1


def test_disabled_cache():
    alloc, cache = make(enabled=False)
    pages = alloc.alloc(3)
    assert cache.insert(list(range(12)), pages) == pages
    m = cache.match_prefix(list(range(12)))
    assert (m.pages, m.num_tokens) == ([], 0) and cache.peek_prefix_len(list(range(12))) == 0
    cache.lock(m.node)
    cache.unlock(m.node)
    assert cache.evict(5) == 0 and cache.cached_pages == 0
    assert cache.stats.queried_tokens == 12 and cache.stats.hit_rate == 0.0


def test_reset_frees_everything_and_stats():
    alloc, cache = make()
    start = alloc.num_free
    for i in range(5):
        seq(alloc, cache, [i] * 4 + list(range(8)))
    seq(alloc, cache, [0] * 4 + [7] * 8)
    matched, queried = cache.stats.matched_tokens, cache.stats.queried_tokens
    m = cache.match_prefix([1] * 4 + list(range(4)) + [5])
    assert m.num_tokens == 8
    assert (cache.stats.matched_tokens - matched, cache.stats.queried_tokens - queried) == (8, 9)
    cache.lock(m.node)
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.unlock(m.node)
    cache.reset()
    assert alloc.num_free == start and cache.cached_pages == 0 and cache.evictable_pages == 0
    assert cache.match_prefix([0] * 4).num_tokens == 0


def test_bad_calls():
    alloc, cache = make()
    with pytest.raises(ValueError):
        cache.insert(list(range(5)), alloc.alloc(1))
    pages = seq(alloc, cache, list(range(4)))
    m = cache.match_prefix(list(range(4)))
    with pytest.raises(RuntimeError):
        cache.unlock(m.node)
    assert m.pages == pages


@pytest.mark.parametrize("page_size,seed", [(1, 0), (4, 1), (16, 2), (4, 3)])
def test_randomized_against_a_model(page_size, seed):
    """Requests with shared prefixes come and go against a small pool. A dict model of the cached
    prefixes predicts every match and every duplicate; a fake page-contents map proves that each page
    handed out holds exactly the tokens it is said to."""
    rng = random.Random(seed)
    num_pages = 40
    alloc, cache = make(num_pages, page_size)
    contents = {}              # page id -> the tokens written into it
    model = {}                 # page-aligned prefix (tuple of tokens) -> page id holding its last page
    live = []                  # (tokens, pages, match); pages[:len(match.pages)] are borrowed
    bases = [[rng.randrange(5) for _ in range(rng.randrange(4 * page_size))] for _ in range(4)]

    def expected_match(tokens):
        pages, n = [], page_size
        while n <= len(tokens) and tuple(tokens[:n]) in model:
            pages.append(model[tuple(tokens[:n])])
            n += page_size
        return pages

    def check_all():
        tree = check_tree(cache)
        assert cache.cached_pages == len(model) and tree == set(model.values())
        private = [p for tokens, pages, m in live for p in pages[len(m.pages):]]
        free = set(alloc._free)
        assert len(private) == len(set(private)) and not (set(private) & tree)
        assert not (free & tree) and not (free & set(private))
        assert alloc.num_free + len(tree) + len(private) == num_pages - 1
        for prefix, page in model.items():
            assert contents[page] == prefix[-page_size:]
        for node in tree_nodes(cache):         # lock counts equal the live sequences through the node
            through = sum(1 for *_, m in live if any(a is node for a in ancestors(m.node)))
            assert node is cache._root or node.lock_ref == through

    def ancestors(node):
        while node is not None:
            yield node
            node = node.parent

    for step in range(600):
        action = rng.random()
        if action < 0.45 and len(live) < 6:                    # admit a request
            tokens = rng.choice(bases) + [rng.randrange(5) for _ in range(rng.randrange(1, 3 * page_size))]
            peek, nodes, clock = cache.peek_prefix_len(tokens), list(tree_nodes(cache)), cache._clock
            assert list(tree_nodes(cache)) == nodes and cache._clock == clock    # peek changes nothing
            m = cache.match_prefix(tokens)
            assert m.pages == expected_match(tokens) and peek == m.num_tokens and m.num_tokens == len(m.pages) * page_size
            for i, p in enumerate(m.pages):
                assert contents[p] == tuple(tokens[i * page_size:(i + 1) * page_size])
            cache.lock(m.node)
            need = -(-len(tokens) // page_size) - len(m.pages)
            if alloc.num_free < need:
                cache.evict(need - alloc.num_free)
                model = {k: p for k, p in model.items() if p not in set(alloc._free)}
            new = alloc.alloc(need)
            if new is None:
                cache.unlock(m.node)
                continue
            for j, p in enumerate(new, start=len(m.pages)):
                contents[p] = tuple(tokens[j * page_size:(j + 1) * page_size])
            live.append((tokens, m.pages + new, m))
        elif action < 0.85 and live:                            # finish a request
            tokens, pages, m = live.pop(rng.randrange(len(live)))
            full = len(tokens) // page_size
            expect_dups = []
            for i in range(full):
                prefix = tuple(tokens[:(i + 1) * page_size])
                if prefix in model and model[prefix] != pages[i]:
                    expect_dups.append(pages[i])
                model.setdefault(prefix, pages[i])
            dups = cache.insert(tokens[:full * page_size], pages[:full])
            assert dups == expect_dups and not (set(dups) & set(m.pages))
            alloc.free(dups + pages[full:])
            cache.unlock(m.node)
        elif action < 0.97:                                     # memory pressure
            before = cache.evictable_pages
            freed = cache.evict(rng.randrange(1, 8))
            assert freed <= before and cache.evictable_pages == before - freed
            model = {k: p for k, p in model.items() if p not in set(alloc._free)}
            for prefix in model:                                # only leaves go: prefixes stay closed
                assert all(prefix[:n] in model for n in range(page_size, len(prefix), page_size))
        else:                                                   # flush everything
            for tokens, pages, m in live:
                alloc.free(pages[len(m.pages):])
                cache.unlock(m.node)
            live.clear()
            cache.reset()
            model.clear()
            assert alloc.num_free == num_pages - 1
        check_all()
    assert cache.stats.matched_tokens > 0
