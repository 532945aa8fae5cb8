"""Scheduler unit tests: admission, chunked prefill, extend/decode alternation, retraction, the
token accounting of postprocess, and aborts. No model: a pass's "sampled" token is a fixed function
of the sequence so far, so a request's output can be checked against what it would generate alone."""
import itertools
import random

import pytest

from dsserve.core import scheduler as scheduler_module
from dsserve.core.batch import BatchItem, ScheduledBatch
from dsserve.core.kv_cache import PageAllocator
from dsserve.core.radix_cache import RadixCache
from dsserve.core.request import Finish, Request
from dsserve.core.worker_protocol import SampleOutput, StepOutput
from dsserve.core.sampling_params import SamplingParams
from dsserve.core.scheduler import MIN_NEW_TOKEN_RATIO, NEW_TOKEN_RATIO_DECAY, Scheduler


# ------------------------------------------------------------------------------------- helpers
def make(num_pages=65, page_size=4, max_running=8, chunk=64, draft_steps=0):
    allocator = PageAllocator(num_pages, page_size)
    s = Scheduler(allocator, RadixCache(allocator, page_size), max_running, chunk, draft_steps)
    s.test_drafter = None   # (steps, rng) for the stand-in worker's drafts; see `step`
    return s


_arrivals = itertools.count()


def req(rid, prompt, max_new=8, output=(), arrival=None, want_prompt_logprobs=False, **params):
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new, temperature=0, **params),
                   0, None, output_ids=list(output), want_prompt_logprobs=want_prompt_logprobs,
                   arrival=next(_arrivals) if arrival is None else arrival)


def model_token(ids):
    """The stand-in model's next token: a function of the whole sequence (like a real model)."""
    return 1000 + (sum(i * (k + 1) for k, i in enumerate(ids)) * 31 + len(ids)) % 97


def by_length(r):
    return Finish("length") if len(r.output_ids) >= r.params.max_new_tokens else None


def step(s, check_finish=by_length):
    """One engine step: schedule, 'run', postprocess. The stand-in worker commits one token per
    completing request, after the drafts of it that agree with model_token (speculative decoding's
    verification); with `s.test_drafter` it drafts the true continuation, each guess wrong with
    probability 1/3."""
    batch = s.schedule()
    if batch is None:
        return None, {}
    tokens, counts, drafts = [], [], []
    for r, item in zip(batch.requests, batch.items):
        if r not in batch.sampling:
            continue
        ids = r.all_ids
        for guess in item.new_token_ids[len(item.new_token_ids) - item.num_drafts:]:
            if guess != model_token(ids):
                break
            ids = ids + [guess]
        ids = ids + [model_token(ids)]
        tokens += ids[r.num_tokens:]
        counts.append(len(ids) - r.num_tokens)
        if s.test_drafter is not None:
            steps, rng = s.test_drafter
            guesses = reference(ids, steps)
            drafts.append([g if rng.random() < 2 / 3 else g + 1 for g in guesses])
    out = StepOutput(SampleOutput(tokens, None, None), num_committed=counts if s.test_drafter else None,
                     drafts=drafts if s.test_drafter else None)
    return batch, s.postprocess(batch, out, check_finish)


def reference(prompt, max_new):
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(model_token(ids))
    return ids[len(prompt):]


def tree_pages(tree):
    stack, pages = [tree._root], []
    while stack:
        node = stack.pop()
        pages += node.pages
        stack.extend(node.children.values())
    return pages


def check_pages(s, stolen=()):
    """Every usable page is in exactly one place: the free list, the tree, `stolen` (taken by the test)
    or privately held by one running request; waiting requests hold nothing; running ones hold exactly
    their computed tokens."""
    free, in_tree = list(s.allocator._free) + list(stolen), tree_pages(s.tree)
    tree_set = set(in_tree)
    private = [p for r in s.running for p in r.pages if p not in tree_set]
    assert sorted(free + in_tree + private) == list(range(1, s.allocator.num_pages))
    for r in s.waiting:
        assert r.pages == [] and r.num_computed == 0 and r.prefix_node is None
    for r in s.running:
        assert len(r.pages) == s.allocator.pages_for(r.num_computed)
    assert set(s.requests.values()) == set(s.running) | set(s.waiting)


def run_to_end(s, limit=2000):
    for _ in range(limit):
        if not s.has_work():
            return
        step(s)
        check_pages(s)
    raise AssertionError("the scheduler made no progress")


# ----------------------------------------------------------------------------------- admission
def test_short_queue_admits_the_longest_cached_prefix_first():
    s = make(max_running=1)
    prefix = list(range(100, 108))                       # 2 pages of 4
    held = s.allocator.alloc(2)
    s.tree.insert(prefix, held)
    plain, shared = req("plain", range(10, 20)), req("shared", prefix + [1, 2, 3])
    s.add(plain)
    s.add(shared)
    batch = s.schedule()
    assert batch.requests == [shared] and list(s.waiting) == [plain]
    item = batch.items[0]
    # The cached pages are reused, not recomputed: the item starts after them.
    assert (item.prefix_len, item.new_token_ids) == (8, [1, 2, 3])
    assert shared.cached_tokens == 8 and shared.pages[:2] == held


@pytest.mark.parametrize("queue,admitted", [(scheduler_module.LPM_QUEUE_LIMIT, "shared"),
                                             (scheduler_module.LPM_QUEUE_LIMIT + 1, "first")])
def test_long_queue_is_first_come_first_served(queue, admitted):
    s = make(max_running=1)
    prefix = list(range(100, 108))
    s.tree.insert(prefix, s.allocator.alloc(2))
    fillers = [req(f"f{i}", [50 + i] * 5) for i in range(queue - 2)]
    for r in [req("first", range(10, 20)), *fillers, req("shared", prefix + [1])]:
        s.add(r)
    assert [r.rid for r in s.schedule().requests] == [admitted]


def test_max_running_requests_is_respected():
    s = make(max_running=2)
    reqs = [req(f"r{i}", [i + 1] * 5, max_new=3) for i in range(5)]
    for r in reqs:
        s.add(r)
    batch, _ = step(s)
    assert batch.requests == reqs[:2] and s.running == reqs[:2] and list(s.waiting) == reqs[2:]
    for _ in range(30):
        batch, _ = step(s)
        if batch is None:
            break
        assert len(s.running) <= 2 and len(batch.requests) <= 2
    assert not s.has_work()
    assert all(r.output_ids == reference(r.prompt_ids, 3) for r in reqs)


def test_a_prompt_larger_than_the_pool_is_not_admitted():
    s = make(num_pages=9, page_size=4)                   # 32 tokens
    big = req("big", range(1, 41), max_new=1)
    s.add(big)
    assert s.schedule() is None
    assert list(s.waiting) == [big] and s.running == [] and big.pages == []
    assert s.allocator.num_free == 8


def _decoding_one_and_waiting_one():
    """A decodes with much output still to come; B's prompt (10 pages) physically fits beside it."""
    s = make(num_pages=33, page_size=4)                  # 32 usable pages
    a = req("a", [1, 2, 3, 4], max_new=40)
    s.add(a)
    step(s)                                              # extend: A's prompt, first token
    step(s)                                              # decode (A alone)
    b = req("b", range(10, 50), max_new=100)
    s.add(b)
    return s, a, b


def test_admission_reserves_a_share_of_remaining_output():
    # At the initial ratio, A's and B's reserved output does not fit: B waits and A decodes.
    s, a, b = _decoding_one_and_waiting_one()
    batch = s.schedule()
    assert batch.kind == "decode" and batch.requests == [a] and list(s.waiting) == [b]
    # The same state with the ratio decayed to its floor (memory held a long time): B is admitted.
    s, a, b = _decoding_one_and_waiting_one()
    s.new_token_ratio = MIN_NEW_TOKEN_RATIO
    batch = s.schedule()
    assert batch.kind == "extend" and batch.requests == [b] and s.running == [a, b]


def test_decode_passes_decay_the_new_token_ratio():
    s = make()
    s.add(req("a", [1, 2, 3], max_new=50))
    step(s)
    before = s.new_token_ratio
    for _ in range(3):
        assert step(s)[0].kind == "decode"
    assert s.new_token_ratio == pytest.approx(before - 3 * NEW_TOKEN_RATIO_DECAY)


def test_requests_admitted_in_the_same_pass_are_not_reserved_twice():
    # 8 pages of 2; three 3-token prompts with one output token each need 2 pages apiece (6 of 8) plus a
    # reservation of 0.7 token each: all three fit. The third is refused because the first two's
    # prompts (already holding their pages) are counted again as uncomputed.
    s = make(num_pages=9, page_size=2)
    reqs = [req(f"r{i}", [10 + i, 20 + i, 30 + i], max_new=1) for i in range(3)]
    for r in reqs:
        s.add(r)
    assert s.schedule().requests == reqs


# ------------------------------------------------------------------------------------ chunking
def _chunks(s, r):
    """Run r's prefill to its end; the (new tokens, prefix_len, logits, completes) of each pass."""
    passes = []
    while not r.output_ids:
        batch, _ = step(s)
        assert batch.kind == "extend" and batch.requests == [r]
        item = batch.items[0]
        passes.append((item.new_token_ids, item.prefix_len, item.logits, batch.completes[0]))
        assert batch.sampling == ([r] if batch.completes[0] else [])
        assert len(item.pages) == s.allocator.pages_for(item.prefix_len + len(item.new_token_ids))
    return passes


def test_long_prompt_is_prefilled_in_chunks():
    s = make(chunk=4)
    prompt = list(range(1, 11))
    r = req("r", prompt, max_new=3)
    s.add(r)
    # Intermediate chunks need no logits; only the chunk that completes the prompt is sampled.
    assert _chunks(s, r) == [(prompt[0:4], 0, "none", False), (prompt[4:8], 4, "none", False),
                             (prompt[8:10], 8, "last", True)]
    assert r.num_computed == 10 and r.output_ids == reference(prompt, 1)


def test_prompt_logprobs_want_every_row_and_skip_the_prefix_cache():
    s = make(chunk=4)
    prompt = list(range(1, 11))
    s.tree.insert(prompt[:8], s.allocator.alloc(2))   # cached, but prompt log-probs need every row
    r = req("r", prompt, want_prompt_logprobs=True)
    s.add(r)
    assert _chunks(s, r) == [(prompt[0:4], 0, "all", False), (prompt[4:8], 4, "all", False),
                             (prompt[8:10], 8, "all", True)]
    assert r.cached_tokens == 0


def test_chunk_budget_is_shared_in_arrival_order():
    s = make(chunk=6)
    a, b = req("a", [1, 2, 3, 4]), req("b", [5, 6, 7, 8, 9])
    s.add(a)
    s.add(b)
    batch, _ = step(s)
    assert [it.new_token_ids for it in batch.items] == [[1, 2, 3, 4], [5, 6]]
    assert batch.completes == [True, False] and batch.sampling == [a]
    assert [it.logits for it in batch.items] == ["last", "none"]
    batch, _ = step(s)                                   # A decodes before B's next chunk
    assert batch.kind == "decode" and batch.requests == [a]
    batch, _ = step(s)
    assert batch.requests == [b] and (batch.items[0].new_token_ids, batch.items[0].prefix_len) == ([7, 8, 9], 2)


# --------------------------------------------------------------------------------- alternation
def test_extend_and_decode_passes_alternate_while_a_prompt_waits():
    s = make(chunk=4)
    a = req("a", [1, 2, 3], max_new=20)
    s.add(a)
    step(s)                                              # extend: A's prompt
    b = req("b", range(10, 22), max_new=20)              # 3 chunks of 4
    s.add(b)
    kinds = []
    for _ in range(7):
        batch, _ = step(s)
        kinds.append((batch.kind, [r.rid for r in batch.requests]))
    # A never waits more than one pass for its next token while B's prompt is prefilled.
    assert kinds == [("decode", ["a"]), ("extend", ["b"]), ("decode", ["a"]), ("extend", ["b"]),
                     ("decode", ["a"]), ("extend", ["b"]), ("decode", ["a", "b"])]


# ---------------------------------------------------------------------------------- retraction
def _under_pressure(specs, waiting=()):
    """Admit `specs` (rid, prompt, earlier output, arrival) in one extend pass, then take every free
    page away so that the next decode pass that needs pages must retract."""
    s = make(num_pages=65, page_size=2, max_running=len(specs))
    reqs = [req(rid, prompt, max_new=12, output=out, arrival=arr) for rid, prompt, out, arr in specs]
    for r in [*reqs, *waiting]:
        s.add(r)
    batch, _ = step(s)
    assert batch.requests == reqs
    stolen = s.allocator.alloc(s.allocator.num_free)
    return s, reqs, stolen


def test_retraction_takes_the_request_with_fewest_output_tokens_first():
    # After the extend pass each has 4 computed tokens (a full page boundary): every decode needs a page.
    # A arrived first but has produced least.
    s, (a, b, c), stolen = _under_pressure([("a", [1, 2, 3, 4], [], 0), ("b", [5, 6], [7, 7], 1),
                                            ("c", [8, 9, 10], [7], 2)])
    batch, _ = step(s)
    assert batch.requests == [b, c] and list(s.waiting) == [a] and a.retractions == 1
    step(s)                                              # 5 computed: no page needed
    batch, _ = step(s)
    assert batch.requests == [b] and list(s.waiting) == [c, a] and s.num_retractions == 2
    check_pages(s, stolen)
    s.allocator.free(stolen)
    run_to_end(s)
    # Retracted requests resume and generate exactly what they would have generated alone.
    assert a.output_ids == reference(a.prompt_ids, 12)
    assert b.output_ids == [7, 7] + reference(b.prompt_ids + [7, 7], 10)
    assert c.output_ids == [7] + reference(c.prompt_ids + [7], 11)


def test_retraction_ties_go_to_the_latest_arrival_which_goes_to_the_front_of_the_queue():
    d = req("d", [40, 41, 42], arrival=99)               # waits: max_running is reached
    s, (a, b, c), stolen = _under_pressure([("a", [1, 2, 3], [7], 0), ("b", [4, 5, 6], [7], 1),
                                            ("c", [8, 9, 10], [7, 7, 7], 2)], waiting=[d])
    ratio, pages = s.new_token_ratio, list(b.pages)
    free_and_evictable = s.allocator.num_free + s.tree.evictable_pages
    batch, _ = step(s)
    assert batch.requests == [a, c] and list(s.waiting) == [b, d]
    assert s.num_retractions == 1 and b.retractions == 1
    assert s.new_token_ratio == pytest.approx(min(1.0, ratio + 0.2) - NEW_TOKEN_RATIO_DECAY)
    # B's pages are released (its computed full pages to the tree, where they are evictable), and A
    # and C took one new page each.
    assert b.pages == [] and b.num_computed == 0
    assert s.allocator.num_free + s.tree.evictable_pages == free_and_evictable + len(pages) - 2
    check_pages(s, stolen)


def _retract_a_with_a_partial_page():
    # A: 5 computed tokens (2 full pages of 2 + 1 partial), 3 outputs; B: 8 computed, 6 outputs. B's next
    # token needs a page, none is free: A (fewer outputs) is retracted.
    s, (a, b), stolen = _under_pressure([("a", [1, 2, 3], [7, 7], 0), ("b", [4, 5, 6], [7] * 5, 1)])
    a_pages = list(a.pages)
    assert s.allocator.num_free == 0
    batch, _ = step(s)
    assert batch.requests == [b] and list(s.waiting) == [a]
    return s, a, b, stolen, a_pages


def test_retraction_frees_the_partial_page_and_caches_the_full_ones():
    s, a, b, stolen, a_pages = _retract_a_with_a_partial_page()
    assert b.pages[-1] == a_pages[2]                     # A's partial page was freed and went to B
    m = s.tree.match_prefix(a.all_ids)                   # A's full pages wait in the tree for its return
    assert (m.num_tokens, m.pages) == (4, a_pages[:2])
    check_pages(s, stolen)
    s.allocator.free(stolen)
    run_to_end(s)
    assert a.output_ids == [7, 7] + reference(a.prompt_ids + [7, 7], 10)


# ------------------------------------------------------------------------------- postprocess
def test_postprocess_accounts_tokens_logprobs_and_finishes():
    s = make(chunk=17)
    a = req("a", [1, 2, 3, 4, 5], logprobs=True, top_logprobs=2)
    b = req("b", [6, 7, 8, 9, 10, 11, 12, 13])
    c = req("c", range(20, 40))                         # only 4 tokens fit the budget: no token yet
    for r in (a, b, c):
        s.add(r)
    batch = s.schedule()
    assert batch.sampling == [a, b]
    b_pages = list(b.pages)
    calls = []

    def check_finish(r):
        calls.append(r)
        return Finish("length") if r is b else None

    top_a, top_b = [(7, -0.5), (1, -2.0)], [(9, -1.5), (2, -3.0)]
    finished = s.postprocess(batch, StepOutput(SampleOutput([7, 9], [-0.5, -1.5], [top_a, top_b])), check_finish)
    assert finished == {b: Finish("length")} and calls == [a, b]
    assert (a.num_computed, c.num_computed) == (5, 4)
    assert (a.output_ids, a.logprobs, a.top_logprobs) == ([7], [-0.5], [top_a])
    assert (b.output_ids, b.logprobs, b.top_logprobs) == ([9], [], [])   # B did not ask for log-probs
    assert c.output_ids == []
    assert s.running == [a, c] and "b" not in s.requests
    # B's computed pages went to the tree: a later request with its prompt reuses them.
    m = s.tree.match_prefix(b.prompt_ids + [0])
    assert (m.num_tokens, m.pages) == (8, b_pages)
    batch = s.schedule()                                 # A keeps decoding from its new token
    assert batch.kind == "decode" and batch.requests == [a]
    assert (batch.items[0].new_token_ids, batch.items[0].prefix_len) == ([7], 5)
    check_pages(s)


def test_postprocess_gives_tokens_to_completing_requests_whatever_the_item_order():
    # A hand-made batch (the scheduler puts a partial chunk last): the sampled rows follow
    # batch.sampling, not the position of the item.
    s = make()
    partial, done = req("partial", range(1, 9)), req("done", [1, 2])
    batch = ScheduledBatch("extend", [partial, done],
                           [BatchItem([1, 2], 0, [], "none"), BatchItem([1, 2], 0, [], "last")])
    s.postprocess(batch, StepOutput(SampleOutput([42], None, None)), lambda r: None)
    assert (partial.output_ids, done.output_ids) == ([], [42])
    assert (partial.num_computed, done.num_computed) == (2, 2)


def test_finished_requests_free_their_partial_page():
    s = make(page_size=4)
    r = req("r", [1, 2, 3, 4, 5, 6], max_new=1)          # 6 tokens: one full page, one partial
    s.add(r)
    step(s)
    assert not s.has_work()
    assert s.tree.cached_pages == 1 and s.allocator.num_free == 63


# ------------------------------------------------------------------------------------- aborts
def test_abort_of_a_waiting_request():
    s = make(max_running=1)
    a, b = req("a", [1, 2, 3]), req("b", [4, 5, 6])
    s.add(a)
    s.add(b)
    step(s)
    assert s.abort("b") is b and list(s.waiting) == [] and "b" not in s.requests
    assert s.abort("b") is None and s.abort("nope") is None


def test_abort_of_a_running_request_mid_prefill_releases_its_pages():
    s = make(page_size=4, chunk=8)
    r = req("r", range(1, 21))
    s.add(r)
    step(s)                                              # 8 of 20 prompt tokens computed
    assert s.abort("r") is r
    assert s.running == [] and s.requests == {} and r.pages == []
    assert s.tree.cached_pages == 2 and s.allocator.num_free + 2 == 64
    assert s.tree.peek_prefix_len(list(range(1, 21))) == 8


def test_abort_all_leaves_only_the_tree_holding_pages():
    s = make(page_size=4, chunk=12, max_running=3)
    prefix = list(range(100, 108))
    s.tree.insert(prefix, s.allocator.alloc(2))       # A and B lock it while they run
    reqs = [req("a", prefix + [1, 2]), req("b", prefix + [3, 4, 5]), req("c", range(30, 50)),
            req("d", [9, 9, 9])]
    for r in reqs:
        s.add(r)
    for _ in range(3):
        step(s)
    # A and B decode, C is mid-prefill, D waits (max_running).
    assert [r.is_decoding for r in s.running] == [True, True, False] and list(s.waiting) == reqs[3:]
    assert s.tree.evictable_pages < s.tree.cached_pages
    assert set(s.abort_all()) == set(reqs)
    assert not s.has_work() and s.requests == {}
    assert s.allocator.num_free + s.tree.cached_pages == s.allocator.num_pages - 1
    assert s.tree.evictable_pages == s.tree.cached_pages   # no prefix left locked


# ----------------------------------------------------------------------------------- end to end
def _random_workload(page_size, chunk, seed, draft_steps=0, num_pages=None):
    rng = random.Random(seed)
    # 64 tokens of cache; prompt + max_new_tokens never exceeds it (the engine refuses such requests).
    s = make(num_pages=num_pages or 1 + 64 // page_size, page_size=page_size, max_running=6, chunk=chunk,
             draft_steps=draft_steps)
    if draft_steps:
        s.test_drafter = (draft_steps, random.Random(seed + 100))
    prefixes = [[rng.randrange(1, 50) for _ in range(12)] for _ in range(3)]
    reqs = []
    for i in range(24):
        prompt = rng.choice(prefixes)[: rng.randint(0, 12)] + [rng.randrange(1, 50) for _ in range(rng.randint(1, 12))]
        reqs.append(req(f"r{i}", prompt, max_new=rng.randint(1, 40)))
    for i, r in enumerate(reqs):                         # requests keep arriving while others run
        s.add(r)
        if i % 3 == 2:
            step(s)
            check_pages(s)
    run_to_end(s)
    return s, reqs


@pytest.mark.parametrize("page_size,chunk", [(1, 5), (2, 7), (4, 16)])
def test_random_workload_keeps_pages_consistent_and_outputs_exact(page_size, chunk):
    # Shared prefixes, a small pool and chunking: retraction, eviction and prefix reuse all happen;
    # every step keeps the page invariants and every request generates what it would alone.
    retractions = 0
    for seed in range(4):
        s, reqs = _random_workload(page_size, chunk, seed)
        retractions += s.num_retractions
        assert s.tree.stats.matched_tokens > 0
        assert all(r.output_ids == reference(r.prompt_ids, r.params.max_new_tokens) for r in reqs)
        assert s.allocator.num_free + s.tree.cached_pages == s.allocator.num_pages - 1
        assert s.tree.evictable_pages == s.tree.cached_pages
    assert retractions > 0


def test_cached_tokens_after_a_retraction_never_exceed_the_prompt():
    s, a, _, stolen, _ = _retract_a_with_a_partial_page()
    s.allocator.free(stolen)
    run_to_end(s)
    assert a.retractions == 1
    # A's prompt had nothing cached; on its return it re-matched 4 tokens of its own (prompt + output).
    assert a.cached_tokens <= len(a.prompt_ids)


# --------------------------------------------------------------------------- speculative decoding
@pytest.mark.parametrize("page_size,chunk,draft_steps", [(1, 5, 1), (2, 7, 3), (4, 16, 2)])
def test_speculative_workload_keeps_pages_consistent_and_outputs_exact(page_size, chunk, draft_steps):
    # As above with drafts verified every decode pass (a third of them wrong): runs of 1..steps+1
    # tokens are committed, rejected drafts' pages freed at each step (check_pages), and outputs are
    # what each request generates alone.
    retractions, multi = 0, 0
    for seed in range(4):
        s, reqs = _random_workload(page_size, chunk, seed, draft_steps)
        retractions += s.num_retractions
        multi += s.num_verified_tokens - s.num_verified
        assert all(r.output_ids == reference(r.prompt_ids, r.params.max_new_tokens) for r in reqs)
        assert s.allocator.num_free + s.tree.cached_pages == s.allocator.num_pages - 1
        assert s.tree.evictable_pages == s.tree.cached_pages
    assert retractions > 0 and multi > 0


@pytest.mark.parametrize("draft_steps", [1, 3])
def test_speculation_leaves_the_pool_and_prefix_tree_as_without_it(draft_steps):
    # A pool large enough that nothing is evicted: the same requests leave the same tree (the same
    # token paths, so no rejected draft's KV was cached) and the same free pages.
    def finish(draft_steps):
        s, reqs = _random_workload(4, 16, 7, draft_steps, num_pages=600)
        return s, {tuple(r.all_ids) for r in reqs}

    plain, plain_seqs = finish(0)
    spec, spec_seqs = finish(draft_steps)
    assert spec_seqs == plain_seqs and spec.num_verified_tokens > spec.num_verified
    assert spec.allocator.num_free == plain.allocator.num_free
    assert _tree_paths(spec.tree) == _tree_paths(plain.tree)


def _tree_paths(tree):
    """Every (token path, pages count) of the prefix tree, root first."""
    found, stack = set(), [(tree._root, ())]
    while stack:
        node, path = stack.pop()
        path = path + tuple(node.key) if hasattr(node, "key") else path
        found.add((path, len(node.pages)))
        stack.extend((child, path) for child in node.children.values())
    return found


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_stop_inside_an_accepted_run_ends_the_request_there(page_size):
    s = make(page_size=page_size, draft_steps=3)
    s.test_drafter = (3, random.Random(0))
    s.test_drafter[1].random = lambda: 0.0          # every draft right: runs of 4 tokens
    a = req("a", [5, 6, 7], max_new=30)
    s.add(a)
    want = reference(a.prompt_ids, 30)
    stop_at = want[6]                                 # inside the second verify pass's run

    def check_finish(r):
        return Finish("stop", stop_at) if r.output_ids[-1] == stop_at else by_length(r)

    finished = {}
    while not finished:
        _, finished = step(s, check_finish)
    assert a.output_ids == want[: want.index(stop_at) + 1]
    # The tree holds the full pages of what it committed before the stop (as without speculation:
    # all but the last token's KV), nothing of the run past it; every other page is free.
    assert all(list(path) == a.all_ids[: len(path)] for path, _ in _tree_paths(s.tree))
    assert s.tree.cached_pages == (a.num_tokens - 1) // page_size
    assert s.allocator.num_free + s.tree.cached_pages == s.allocator.num_pages - 1


def test_drafts_never_exceed_the_tokens_a_request_may_still_take():
    s = make(draft_steps=3)
    s.test_drafter = (3, random.Random(0))
    s.test_drafter[1].random = lambda: 0.0
    a = req("a", [5, 6, 7], max_new=6)
    s.add(a)
    fed = []
    while s.has_work():
        batch, _ = step(s)
        fed += [it.num_drafts for it in batch.items if batch.kind == "decode"]
        check_pages(s)
    # prefill gives 1 token, a verify of 3 drafts 4 more; the last pass may verify only 0 more.
    assert a.output_ids == reference(a.prompt_ids, 6) and fed == [3, 0]
