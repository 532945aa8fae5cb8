"""What one forward pass needs to know about the tokens it runs.

The scheduler decides which sequences run; the model runner turns that into a `ForwardBatch`; the
model graph passes `batch.attn` to the attention backend of every layer. Tokens of all sequences are
packed along one axis (no padding): sequence i owns rows `extend_start[i] : extend_start[i] + extend_lens[i]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Paged-KV bookkeeping for one forward pass, shared by every layer.

    is_decode:     every sequence adds exactly one token (`extend_lens` all 1).
    seq_lens:      [B] int32, tokens in the cache for each sequence after this pass (prefix + new).
    extend_lens:   [B] int32, new tokens of each sequence in this pass.
    prefix_lens:   [B] int32, tokens already cached before this pass (`seq_lens - extend_lens`).
    extend_start:  [B] int32, row of each sequence's first new token in the packed token axis.
    page_table:    [B, max_pages] int32, page ids of each sequence in order; unused slots are 0.
    out_cache_loc: [T] int64, flat cache slot (`page * page_size + offset`) each new token is written to.
    positions:     [T] int64, position of each new token in its sequence.
    page_size:     tokens per page.
    The `*_cpu` lists mirror the tensors for backends that loop over sequences on the host.
    """

    is_decode: bool
    seq_lens: torch.Tensor
    extend_lens: torch.Tensor
    prefix_lens: torch.Tensor
    extend_start: torch.Tensor
    page_table: torch.Tensor
    out_cache_loc: torch.Tensor
    positions: torch.Tensor
    page_size: int
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    prefix_lens_cpu: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.out_cache_loc.shape[0])

    def cache_slots(self, i: int) -> torch.Tensor:
        """Flat cache slots of all `seq_lens[i]` tokens of sequence i, in position order."""
        n = self.seq_lens_cpu[i]
        num_pages = (n + self.page_size - 1) // self.page_size
        pages = self.page_table[i, :num_pages].to(torch.int64)
        offsets = torch.arange(self.page_size, device=pages.device)
        return (pages[:, None] * self.page_size + offsets[None, :]).reshape(-1)[:n]

    def per_token(self) -> "AttentionMetadata":
        """This pass with each new token as a sequence of its own that ends at that token (its
        sequence's pages, its position + 1 tokens): a decode pass of T sequences. Attention then
        computes every token with decode's arithmetic, so a token's output does not depend on how
        its sequence was split into passes (chunked prefill, the prefix cache, retraction's
        recompute) -- what --enable-deterministic-inference needs."""
        if self.is_decode:
            return self
        lens = [p + j + 1 for p, e in zip(self.prefix_lens_cpu, self.extend_lens_cpu) for j in range(e)]
        owner = torch.repeat_interleave(torch.arange(self.batch_size, device=self.page_table.device),
                                        self.extend_lens.to(torch.int64))
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=self.seq_lens.device)
        ones = torch.ones_like(seq_lens)
        return AttentionMetadata(
            is_decode=True, seq_lens=seq_lens, extend_lens=ones, prefix_lens=seq_lens - 1,
            extend_start=torch.arange(len(lens), dtype=torch.int32, device=seq_lens.device),
            page_table=self.page_table.index_select(0, owner), out_cache_loc=self.out_cache_loc,
            positions=self.positions, page_size=self.page_size, seq_lens_cpu=lens,
            extend_lens_cpu=[1] * len(lens), prefix_lens_cpu=[n - 1 for n in lens],
        )

    @classmethod
    def build(
        cls,
        *,
        prefix_lens: list[int],
        extend_lens: list[int],
        page_table: torch.Tensor | list[list[int]],
        page_size: int,
        device: torch.device | str,
    ) -> "AttentionMetadata":
        """Derive every field from the per-sequence prefix/extend lengths and the page table (a
        tensor, or each sequence's page list). Built in Python lists and converted once per field:
        this runs every step, and a decode step is dominated by per-tensor overhead."""
        rows = page_table.tolist() if isinstance(page_table, torch.Tensor) else page_table
        width = max((len(r) for r in rows), default=0)
        table = [list(r) + [0] * (width - len(r)) for r in rows]
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        starts, positions, out_loc, acc = [], [], [], 0
        for pages, p, e in zip(table, prefix_lens, extend_lens):
            starts.append(acc)
            acc += e
            for pos in range(p, p + e):
                positions.append(pos)
                out_loc.append(pages[pos // page_size] * page_size + pos % page_size)

        def tensor(xs, dtype=torch.int32):
            return torch.tensor(xs, dtype=dtype, device=device)

        return cls(
            is_decode=all(e == 1 for e in extend_lens),
            seq_lens=tensor(seq_lens),
            extend_lens=tensor(extend_lens),
            prefix_lens=tensor(prefix_lens),
            extend_start=tensor(starts),
            page_table=tensor(table).reshape(len(table), width),
            out_cache_loc=tensor(out_loc, torch.int64),
            positions=tensor(positions, torch.int64),
            page_size=page_size,
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=list(extend_lens),
            prefix_lens_cpu=list(prefix_lens),
        )


@dataclass
class ForwardBatch:
    """Inputs of one model forward pass.

    input_ids:      [T] int64, the new tokens of every sequence, packed.
    attn:           the paged-KV metadata (positions live there).
    logits_indices: [B] int64, rows whose logits are wanted (the last new token of each sequence,
                    or every row when prompt log-probs are asked for).
    """

    input_ids: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor
