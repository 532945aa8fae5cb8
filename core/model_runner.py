"""Builds the model on the chosen device and runs forward passes over packed, paged batches."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .batch import BatchItem
from .config import EngineArgs
from .distributed import RankInfo
from .forward_batch import AttentionMetadata, ForwardBatch
from .kv_cache import KVPool
from .plugins import PluginRegistry, default_registry

log = logging.getLogger("dsserve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --kv-cache-dtype values; "auto" is the compute dtype.
_KV_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2}


class ModelRunner:
    """Owns the model (this rank's shard of it) and its KV pool; knows nothing about requests or
    scheduling."""

    def __init__(self, args: EngineArgs, registry: PluginRegistry | None = None, ranks: RankInfo = RankInfo()):
        from dsserve.models.layers import LayerContext
        from dsserve.models.loader import build_model, quant_config, read_config, resolve_model_path

        registry = registry or default_registry()
        self.ranks = ranks
        self.device = registry.select_device(args.device)
        self.device.setup(ranks.local_rank, ranks.ranks_on_node)
        ranks.join(self.device.dist_backend)
        self.dtype = compute_dtype(self.device, args.dtype)
        self.kv_cache_dtype = _kv_cache_dtype(args.kv_cache_dtype, self.dtype)
        self.model_path = resolve_model_path(args.model_path)
        self.config = cfg = read_config(self.model_path)
        self.torch_device = self.device.torch_device(ranks.local_rank)
        ctx = LayerContext(
            device=self.device, registry=registry, dtype=self.dtype, torch_device=self.torch_device,
            comm=registry.communicator(self.device, None, ranks.rank, ranks.world_size),
            quant=quant_config(self.model_path, cfg, args.quantization), page_size=args.page_size,
            kv_cache_dtype=self.kv_cache_dtype, expert_parallel=args.ep_size > 1,
            batch_invariant=args.enable_deterministic_inference,
        )
        self.batch_invariant = args.enable_deterministic_inference
        log.info("device: %s; dtype %s%s", self.device.describe(), str(self.dtype).removeprefix("torch."),
                 f"; tensor-parallel rank {ranks.rank} of {ranks.world_size}" if ranks.world_size > 1 else "")
        self.model = build_model(self.model_path, cfg, ctx, allow_nonfinite=args.allow_nonfinite_weights)
        # The draft model of speculative decoding: the checkpoint's MTP layer, with a KV cache of its own
        # (the pool's last) on the same pages as the model's.
        self.mtp = self._build_mtp(cfg, ctx, args) if args.speculative_steps else None
        self.context_len = min(args.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.backends = [layer.self_attn.backend for layer in self.model.layers]
        if self.mtp is not None:
            self.backends += self.mtp.attention_backends()
        self.kv = KVPool(self.backends, self._pool_pages(args), self.torch_device)
        per_token = KVPool.bytes_per_token(self.backends)
        log.info("KV cache: %s, %d tokens in %d pages of %d (%.1f MiB, %d B/token); longest context %d tokens",
                 str(self.kv_cache_dtype).removeprefix("torch."), self.kv.capacity_tokens, self.kv.num_pages,
                 self.kv.page_size, self.kv.capacity_tokens * per_token / 2**20, per_token, self.max_context)

    def _build_mtp(self, cfg, ctx, args: EngineArgs):
        from dsserve.models.loader import CheckpointError
        from dsserve.models.mtp import build_mtp

        try:
            mtp = build_mtp(self.model_path, cfg, ctx, self.model, allow_nonfinite=args.allow_nonfinite_weights)
        except CheckpointError as e:
            raise CheckpointError(f"--speculative-algorithm {args.speculative_algorithm} drafts with the model's MTP "
                                  f"layer: {e}") from None
        log.info("speculative decoding: the MTP layer drafts %d token(s) a step, verified in one pass",
                 args.speculative_steps)
        return mtp

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt + output) a request may reach."""
        return min(self.context_len, self.kv.capacity_tokens)

    def _pool_pages(self, args: EngineArgs) -> int:
        page = self.backends[0].page_size
        if args.max_total_tokens:
            tokens = args.max_total_tokens
        else:
            free, _ = self.device.memory_info()
            if self.device.memory_per_node:  # the host's RAM: every rank on the node takes its share
                free //= self.ranks.ranks_on_node
            tokens = int(free * args.mem_fraction_static) // KVPool.bytes_per_token(self.backends)
            # More than every running request at full context can never be used.
            tokens = min(tokens, self.context_len * args.max_running_requests)
        pages = max(2, (tokens + page - 1) // page + 1)  # +1: page 0 is reserved
        if self.ranks.world_size > 1:  # one page table serves every rank: the smallest pool wins
            agreed = torch.tensor([pages], dtype=torch.int64)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            pages = int(agreed)
        return pages

    def forward(self, items: list[BatchItem]) -> torch.Tensor:
        """float32 logits of the rows the items ask for (BatchItem.logits), item by item."""
        return self.forward_hidden(items)[0]

    @torch.inference_mode()
    def forward_hidden(self, items: list[BatchItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's logits, and the final-normed hidden states of every new token [T, hidden]
        (what the MTP layer drafts from)."""
        batch = self._forward_batch(items, per_token=any(it.num_drafts for it in items))
        for backend in self.model.attention_backends():  # one per distinct spec, not per layer
            backend.prepare(batch.attn)
        hidden = self.model(batch.input_ids, batch.attn, self.kv.caches)
        return self.model.compute_logits(hidden[batch.logits_indices]), hidden

    @torch.inference_mode()
    def draft(self, items: list[BatchItem], hidden: torch.Tensor, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the MTP layer over its own cache: items' tokens (t_{i+1} at position i) with
        `hidden` [T, hidden] (h_i, a row per token); the draft logits of the rows the items ask for
        and the layer's output there (the next draft step's h). `per_token`: attend as decode does
        (see _forward_batch), for the few tokens a decode step's catch-up feeds."""
        batch = self._forward_batch(items, per_token)
        for backend in self.mtp.attention_backends():
            backend.prepare(batch.attn)
        out = self.mtp(batch.input_ids, hidden, batch.attn, self.kv.caches[-1])[batch.logits_indices]
        return self.mtp.compute_logits(out), out

    def _forward_batch(self, items: list[BatchItem], per_token: bool = False) -> ForwardBatch:
        """`per_token`: attention computes each new token as a decode query of its own (a verify pass of
        a few drafts after a long prefix: decode attention reads the cache once per token, where an
        extend pass would expand the whole prefix; MLA's absorbed decode never does)."""
        meta = AttentionMetadata.build(
            prefix_lens=[it.prefix_len for it in items], extend_lens=[len(it.new_token_ids) for it in items],
            page_table=[it.pages for it in items], page_size=self.kv.page_size, device=self.torch_device,
        )
        if self.batch_invariant or per_token:
            meta = meta.per_token()
        rows, start = [], 0
        for it in items:
            n = len(it.new_token_ids)
            rows.extend(range(start + n - it.num_logit_rows, start + n))  # the last rows of each item
            start += n
        ids = torch.tensor([t for it in items for t in it.new_token_ids], dtype=torch.int64, device=self.torch_device)
        return ForwardBatch(ids, meta, torch.tensor(rows, dtype=torch.int64, device=self.torch_device))


def compute_dtype(device, name: str) -> torch.dtype:
    """The dtype --dtype names; "auto" is the device's default."""
    return device.default_dtype() if name == "auto" else _DTYPES[name]


def _kv_cache_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """The cache dtype --kv-cache-dtype names; an 8-bit one halves a bfloat16 cache's bytes per token."""
    if name == "auto":
        return compute
    if name not in _KV_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not one of auto, {', '.join(_KV_DTYPES)}")
    return _KV_DTYPES[name]
