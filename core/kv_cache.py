"""The paged KV cache: one pool of pages per layer and the allocator that hands pages out."""
from __future__ import annotations

import torch

from .backends import AttentionBackend


class PageAllocator:
    """Free-list of the pool's page ids (the engine's bookkeeping; the pages themselves live with the
    model). Page 0 is never handed out: padded page tables point at it, so a kernel that reads a
    padding entry reads harmless memory and never a live sequence's KV."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError("the KV pool needs at least 2 pages")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, 0, -1))

    def pages_for(self, tokens: int) -> int:
        return (tokens + self.page_size - 1) // self.page_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n page ids, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        taken = self._free[-n:] if n else []
        del self._free[len(self._free) - n:]
        return taken[::-1]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class KVPool:
    """Per-layer caches in the layout each layer's attention backend asks for."""

    def __init__(self, backends: list[AttentionBackend], num_pages: int, device: torch.device):
        page_sizes = {b.page_size for b in backends}
        if len(page_sizes) != 1:
            raise ValueError(f"attention backends disagree on the page size: {sorted(page_sizes)}")
        self.page_size = page_sizes.pop()
        self.num_pages = num_pages
        # create_cache zero-fills: every page is written, so the pool is resident (page-faulted) before
        # the first request rather than faulted in by the first prefills.
        self.caches = [b.create_cache(num_pages, device) for b in backends]

    @property
    def capacity_tokens(self) -> int:
        """Tokens the pool can hold (page 0 excluded)."""
        return (self.num_pages - 1) * self.page_size

    @staticmethod
    def bytes_per_token(backends: list[AttentionBackend]) -> int:
        return sum(b.spec.kv_elements_per_token * torch.empty(0, dtype=b.spec.dtype).element_size()
                   for b in backends)
