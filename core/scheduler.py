"""Continuous batching: which requests run in the next forward pass, and the KV pages they hold.

Each step is either an *extend* pass (prefill chunks of newly admitted or partly prefilled
requests, within `chunked_prefill_size` tokens) or a *decode* pass (one token for every decoding
request). While prompts wait, the two alternate so running requests keep decoding during a long
prefill. Memory: pages come from the allocator, then from evicting the prefix tree, then from
retracting the requests with the least progress (they resume later with identical output).

With speculative decoding a decode pass also feeds each request's drafts after its last token
(core/speculative.py); the pass commits 1..drafts+1 tokens of it, and the pages past what it
committed go back to the allocator (rejected drafts never reach the prefix tree).
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable

from .batch import BatchItem, ScheduledBatch
from .kv_cache import PageAllocator
from .radix_cache import RadixCache
from .request import Finish, Request
from .worker_protocol import StepOutput

log = logging.getLogger("dsserve")

# Admission reserves this fraction of each running request's remaining max_new_tokens; it decays
# towards the floor while memory holds and jumps back after a retraction.
INIT_NEW_TOKEN_RATIO, MIN_NEW_TOKEN_RATIO, NEW_TOKEN_RATIO_DECAY = 0.7, 0.15, 0.002
# Below this queue length admission prefers the request with the longest cached prefix.
LPM_QUEUE_LIMIT = 32


class Scheduler:
    """Owns every request from its arrival to its end: the queue, the running set, their KV pages
    and the token accounting after each pass."""

    def __init__(self, allocator: PageAllocator, tree: RadixCache, max_running: int, chunked_prefill_size: int,
                 draft_steps: int = 0):
        self.allocator, self.tree = allocator, tree
        self.max_running = max_running
        self.chunk_budget = chunked_prefill_size
        # The worker's drafting writes the MTP layer's cache this many positions past a pass's own tokens.
        self.draft_lookahead = max(0, draft_steps - 1)
        self.num_verified = self.num_verified_tokens = 0   # requests' verify passes, tokens they committed
        self.requests: dict[str, Request] = {}   # every request not yet finished, by rid
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self._last_kind = "decode"

    # ------------------------------------------------------------------------------- public API
    def add(self, req: Request) -> None:
        self.requests[req.rid] = req
        self.waiting.append(req)

    def abort(self, rid: str) -> Request | None:
        """End request `rid` wherever it is (None: it has already finished)."""
        req = self.requests.get(rid)
        if req is not None:
            self.finish(req)
        return req

    def abort_all(self) -> list[Request]:
        reqs = list(self.requests.values())
        for req in reqs:
            self.finish(req)
        return reqs

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        decoding = [r for r in self.running if r.is_decoding]
        wants_extend = self.waiting or len(decoding) < len(self.running)
        if wants_extend and (self._last_kind == "decode" or not decoding):
            batch = self._schedule_extend()
            if batch is not None:
                self._last_kind = "extend"
                return batch
        self._last_kind = "decode"
        return self._schedule_decode(decoding)

    def postprocess(self, batch: ScheduledBatch, out: StepOutput,
                    check_finish: Callable[[Request], Finish | None]) -> dict[Request, Finish]:
        """Account for a pass that ran: its tokens are now in the cache (but rejected drafts), each
        sampling request takes its new tokens one by one, and those that `check_finish` says are done
        finish (their pages freed; a stop inside an accepted run ends the request there)."""
        runs, drafts = iter(out.committed()), iter(out.drafts or [])
        finished = {}
        for req, item, done in zip(batch.requests, batch.items, batch.completes):
            if not done:
                req.num_computed += len(item.new_token_ids)
                continue
            run = next(runs)
            req.num_computed += len(item.new_token_ids) - item.num_drafts + len(run) - 1
            req.draft_ids = next(drafts, []) if req.token_override is None else []
            if item.num_drafts:
                self.num_verified += 1
                self.num_verified_tokens += len(run)
            for row in run:
                req.append_token(*out.sampled.row(row))
                finish = check_finish(req)
                if finish is not None:
                    req.num_computed = min(req.num_computed, req.num_tokens - 1)  # the KV a non-speculative run has
                    self.finish(req)
                    finished[req] = finish
                    break
            else:
                self._shrink(req)
        return finished

    def finish(self, req: Request) -> None:
        """Release a finished or aborted request: its full pages go to the prefix tree."""
        self.requests.pop(req.rid, None)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def kv_usage(self) -> float:
        used = self.allocator.num_pages - 1 - self.allocator.num_free - self.tree.evictable_pages
        return used / (self.allocator.num_pages - 1)

    # ------------------------------------------------------------------------------ extend step
    def _schedule_extend(self) -> ScheduledBatch | None:
        budget = self.chunk_budget
        reqs, chunks = [], []
        for r in self.running:
            if budget == 0:
                break
            if r.is_decoding:
                continue
            chunk = min(r.uncomputed, budget)
            if not self._grow(r, self._backed(r, chunk)):
                break
            reqs.append(r)
            chunks.append(chunk)
            budget -= chunk
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            r = self._next_waiting()
            chunk = self._admit(r, budget)
            if chunk == 0:
                break
            reqs.append(r)
            chunks.append(chunk)
            budget -= chunk
        if not reqs:
            return None
        items = []
        for r, chunk in zip(reqs, chunks):
            done = r.num_computed + chunk == r.num_tokens
            logits = "all" if r.want_prompt_logprobs else ("last" if done else "none")
            items.append(BatchItem(r.all_ids[r.num_computed: r.num_computed + chunk], r.num_computed,
                                   r.pages, logits))
        return ScheduledBatch("extend", reqs, items)

    def _next_waiting(self) -> Request:
        if len(self.waiting) <= LPM_QUEUE_LIMIT and len(self.waiting) > 1:
            # Longest-prefix-match first keeps shared prefixes hot in the tree; FCFS for long queues.
            best = max(self.waiting, key=lambda r: self.tree.peek_prefix_len(r.all_ids[:-1]))
            self.waiting.remove(best)
            self.waiting.appendleft(best)
        return self.waiting[0]

    def _admit(self, r: Request, budget: int) -> int:
        """Move the head of the queue into running with its cached prefix; returns its first chunk
        (0: not admitted now)."""
        match = None if r.want_prompt_logprobs else self.tree.match_prefix(r.all_ids[:-1])
        cached = match.num_tokens if match else 0
        if not self._fits(r, cached):
            return 0
        if match is not None:
            self.tree.lock(match.node)
            r.prefix_node, r.pages = match.node, list(match.pages)
        r.num_computed = cached
        if not r.retractions:  # a resumed request re-matches its own pages: not prompt cache hits
            r.cached_tokens = cached
        chunk = min(r.uncomputed, budget)
        if not self._grow(r, self._backed(r, chunk)):
            self._release(r)
            return 0
        self.waiting.popleft()
        self.running.append(r)
        return chunk

    def _fits(self, r: Request, cached: int) -> bool:
        """Optimistic admission: room for this prompt plus a share of everyone's remaining output.
        Input already backed by pages (a chunk granted earlier in this pass) is counted by num_free."""
        page = self.allocator.page_size
        available = self.allocator.num_free + self.tree.evictable_pages
        reserved = sum(
            (max(0, x.params.max_new_tokens - len(x.output_ids)) * self.new_token_ratio
             + max(0, x.num_tokens - len(x.pages) * page)) / page
            for x in self.running
        )
        need = (r.num_tokens - cached + r.params.max_new_tokens * self.new_token_ratio) / page + 1
        return need + reserved <= available or (not self.running and r.num_tokens - cached < available * page)

    # ------------------------------------------------------------------------------ decode step
    def _schedule_decode(self, decoding: list[Request]) -> ScheduledBatch | None:
        while True:
            need = sum(self.allocator.pages_for(self._backed(r, 1 + len(self._drafts(r)))) - len(r.pages)
                       for r in decoding)
            if need <= self.allocator.num_free:
                break
            self.tree.evict(need - self.allocator.num_free)
            if need <= self.allocator.num_free:
                break
            self._retract(decoding)
        if not decoding:
            return None
        items = []
        for r in decoding:
            drafts = self._drafts(r)
            self._grow(r, self._backed(r, 1 + len(drafts)))
            items.append(BatchItem([r.output_ids[-1], *drafts], r.num_computed, r.pages, "last", len(drafts)))
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return ScheduledBatch("decode", decoding, items)

    @staticmethod
    def _drafts(r: Request) -> list[int]:
        """The drafts r's next decode pass verifies: no more than its token budget can still take."""
        return r.draft_ids[: max(0, r.params.max_new_tokens - len(r.output_ids) - 1)]

    def _backed(self, r: Request, fed: int) -> int:
        """Tokens of r that need pages for a pass feeding `fed` of them: its cache so far, those, and
        when the pass completes r's input, the MTP layer's drafting after them (never past r's longest
        possible sequence)."""
        tokens = r.num_computed + fed
        if tokens < r.num_tokens:
            return tokens
        return min(tokens + self.draft_lookahead, max(tokens, len(r.prompt_ids) + r.params.max_new_tokens))

    def _retract(self, decoding: list[Request]) -> None:
        """Send the request with the least progress back to the queue, freeing its pages."""
        victim = min(decoding, key=lambda r: (len(r.output_ids), -r.arrival))
        decoding.remove(victim)
        self.running.remove(victim)
        self._release(victim)
        victim.retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(victim)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.2)
        log.info("KV cache full: retracted request %s (%d tokens); it resumes when memory frees",
                 victim.rid, victim.num_tokens)

    # ---------------------------------------------------------------------------------- memory
    def _grow(self, r: Request, tokens: int) -> bool:
        """Give r pages for `tokens` tokens, evicting from the prefix tree when needed."""
        need = self.allocator.pages_for(tokens) - len(r.pages)
        if need <= 0:
            return True
        if self.allocator.num_free < need:
            self.tree.evict(need - self.allocator.num_free)
        pages = self.allocator.alloc(need)
        if pages is None:
            return False
        r.pages.extend(pages)
        return True

    def _shrink(self, r: Request) -> None:
        """Free r's pages past its cache (those of rejected drafts and of the drafting after them)."""
        keep = self.allocator.pages_for(r.num_computed)
        if len(r.pages) > keep:
            self.allocator.free(r.pages[keep:])
            del r.pages[keep:]

    def _release(self, r: Request) -> None:
        """Hand r's computed full pages to the prefix tree, free the rest, drop its tree lock."""
        page = self.allocator.page_size
        full = min(r.num_computed // page, len(r.pages))
        duplicates = self.tree.insert(r.all_ids[: full * page], r.pages[:full]) if full else []
        self.allocator.free(duplicates + r.pages[full:])
        if r.prefix_node is not None:
            self.tree.unlock(r.prefix_node)
        r.pages, r.num_computed, r.prefix_node, r.draft_ids = [], 0, None, []
