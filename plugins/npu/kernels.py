"""Backends on torch_npu's fused Ascend ops (imported lazily, inside the calls that need them).

Written from torch_npu's documentation (Ascend/op-plugin docs/context/*.md and the hiascend.com
"Ascend Extension for PyTorch" API pages); NOT run on Ascend hardware here: no NPU is available to
this project. What is used, and with which documented signature:

* MHA/GQA attention: ``torch_npu.npu_fused_infer_attention_score(query, key, value, *,
  atten_mask, actual_seq_lengths, actual_seq_lengths_kv, block_table, num_heads, scale,
  input_layout, num_key_value_heads, sparse_mode, block_size)`` -> (attention_out, softmax_lse).
  PageAttention mode: key/value are the paged caches viewed as (blocknum, blocksize, KV_N * D),
  block_table [B, max_pages] int32, actual_seq_lengths_kv required. input_layout "BSND": queries are
  padded to [B, S_max, N, D] and actual_seq_lengths holds each sequence's new-token count.
  Decode (Q_S == 1): sparse_mode 0, no mask. Extend: sparse_mode 3 (rightDownCausal, the diagonal
  aligned to the last key, which is right for a cached prefix) with the documented 2048x2048
  upper-triangular bool mask (True = masked). The documented PageAttention block size is 128..512,
  a multiple of 128, so that is what `supports` accepts; key and value must have equal shapes,
  so head_dim must equal v_head_dim. (TND would avoid the padding, but the docs restrict TND
  without rope inputs to head dim 192 and no PageAttention.)
* MLA: served by the torch reference (`ReferenceMLAAttention`). The same op documents an MLA
  decode form (query_rope / key_rope, query d 512, rope d 64, key N 1, block_size 16 or 128), but
  it wants the latent and rope parts of the cache as two separate contiguous tensors, and dsserve's
  standard MLA cache interleaves them per token ([pages, page, 512 + 64]); slicing it gives
  non-contiguous tensors, which the op does not accept. Using it needs a split cache layout.
* KV cache writes: plain ``Tensor.index_copy_`` on the flattened pages (not npu_scatter_nd_update_).
* MoE routing for softmax + greedy: ``torch_npu.npu_moe_gating_top_k_softmax(x, finished=None, k=1)``
  -> (y, expert_idx int32, row_idx int32); normalisation and routed_scaling_factor in torch. Other
  scoring functions / top-k methods: the reference `select_experts`.
* MoE experts: ``torch_npu.npu_moe_init_routing(x, row_idx, expert_idx, active_num)`` ->
  (expanded_x, expanded_row_idx, expanded_expert_idx); ``torch_npu.npu_grouped_matmul([x],
  [weight], group_list=..., split_item=2, group_type=0, group_list_type=0)`` -> [y] (x single
  tensor grouped along M, weight [E, K, N], group_list the cumulative row count per expert);
  SiLU-and-mul in plain torch between the two GEMMs; ``torch_npu.npu_moe_finalize_routing(
  expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
  export_for_source_row, drop_pad_mode=0)``. The npu_grouped_matmul keyword names are from its doc
  page's prototype and from how vllm-ascend calls it; whether a transposed (non-contiguous)
  weight view is accepted without a copy is unverified.

The host-side argument builders (`fia_lengths`, `padded_rows`, `routing_row_idx`,
`expert_cumsum`) are plain torch and are tested on CPU (tests/test_npu_plugin.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dsserve.core.backends import (
    AttentionSpec,
    MHAAttentionBackend,
    MoEBackend,
    MoESpec,
)
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.core.reference import ReferenceMLAAttention, select_experts

_HALF = (torch.float16, torch.bfloat16)
_MASK_SIZE = 2048  # the "optimised" causal mask sparse_mode 3 documents


def _npu():
    import torch_npu

    return torch_npu


# ------------------------------------------------------------------------------ argument builders


def fia_lengths(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    """(actual_seq_lengths, actual_seq_lengths_kv) for the BSND layout: per sequence, the new tokens
    and the whole cached context (prefix + new), not cumulative."""
    return list(meta.extend_lens_cpu), list(meta.seq_lens_cpu)


def block_table(meta: AttentionMetadata) -> torch.Tensor:
    """The page table as the op's block_table: [B, max_pages] int32, contiguous."""
    return meta.page_table.to(torch.int32).contiguous()


def padded_rows(extend_lens: list[int]) -> tuple[torch.Tensor, int]:
    """Row of each packed token in the [B * S_max] padded query, and S_max."""
    longest = max(extend_lens, default=0)
    rows = [b * longest + j for b, n in enumerate(extend_lens) for j in range(n)]
    return torch.tensor(rows, dtype=torch.int64), longest


def routing_row_idx(tokens: int, k: int) -> torch.Tensor:
    """row_idx as npu_moe_gating_top_k_softmax documents it: arange(T*k).reshape(k, T).T, int32;
    entry [t, j] = j * T + t."""
    return torch.arange(tokens * k, dtype=torch.int32).reshape(k, tokens).t().contiguous()


ROUTING_MAX_ELEMENTS = 2 ** 24 - 1  # npu_moe_init_routing's input bound (elements of x)


def routing_chunk_tokens(hidden: int) -> int:
    """The most tokens one npu_moe_init_routing call may take at this hidden size."""
    return max(1, ROUTING_MAX_ELEMENTS // hidden)


def expert_cumsum(sorted_expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """group_list for group_list_type 0: cumulative count of rows per expert, int64 [E]."""
    counts = torch.bincount(sorted_expert_ids.to(torch.int64), minlength=num_experts)
    return counts.cumsum(0)


def _write(flat: torch.Tensor, loc: torch.Tensor, rows: torch.Tensor) -> None:
    flat.index_copy_(0, loc, rows.to(flat.dtype))


# ------------------------------------------------------------------------------------ attention


class NpuMHAAttention(MHAAttentionBackend):
    """MHA/GQA over the paged K/V caches by npu_fused_infer_attention_score (PageAttention, BSND)."""

    DEFAULT_PAGE = 128

    @staticmethod
    def unsupported(spec: AttentionSpec) -> str | None:
        if spec.kind != "mha":
            return f"kind {spec.kind!r}"
        if spec.dtype not in _HALF:
            return f"cache dtype {spec.dtype} (float16/bfloat16 only)"
        if spec.kv_scale != 1.0:
            return f"kv_scale {spec.kv_scale} (the fused op reads the cache unscaled)"
        if spec.head_dim != spec.v_head_dim:
            return f"head_dim {spec.head_dim} != v_head_dim {spec.v_head_dim} (key and value shapes must match)"
        if spec.head_dim % 16 or spec.head_dim > 512:
            return f"head_dim {spec.head_dim} (a multiple of 16, at most 512)"
        if spec.num_kv_heads <= 0 or spec.num_heads % spec.num_kv_heads:
            return f"{spec.num_heads} heads over {spec.num_kv_heads} KV heads"
        if spec.num_heads // spec.num_kv_heads > 64 or spec.num_heads > 256:
            return f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads (group <= 64, heads <= 256)"
        if spec.num_kv_heads * spec.head_dim > 65535:
            return "KV_N * D > 65535 in the (blocknum, blocksize, H) layout"
        p = spec.page_size
        if p is not None and (p % 128 or not 128 <= p <= 512):
            return f"page size {p} (PageAttention: 128..512, a multiple of 128)"
        return None

    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return cls.unsupported(spec) is None

    @property
    def page_size(self) -> int:
        return self.spec.page_size or self.DEFAULT_PAGE

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self._mask: torch.Tensor | None = None

    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        if self._mask is None or self._mask.device != device:
            ones = torch.ones(_MASK_SIZE, _MASK_SIZE, dtype=torch.bool, device=device)
            self._mask = torch.triu(ones, diagonal=1)  # True = not attended
        return self._mask

    def _write_kv(self, k, v, cache, meta):
        k_cache, v_cache = cache
        _write(k_cache.view(-1, *k_cache.shape[2:]), meta.out_cache_loc, k)
        _write(v_cache.view(-1, *v_cache.shape[2:]), meta.out_cache_loc, v)
        pages, page = k_cache.shape[:2]
        return k_cache.view(pages, page, -1), v_cache.view(pages, page, -1)

    def _attend(self, query, key, value, meta, q_lens, causal):
        s = self.spec
        kwargs = {}
        if causal:
            kwargs = {"atten_mask": self._causal_mask(query.device), "sparse_mode": 3}
        out, _ = _npu().npu_fused_infer_attention_score(
            query, key, value,
            actual_seq_lengths=q_lens,
            actual_seq_lengths_kv=list(meta.seq_lens_cpu),
            block_table=block_table(meta),
            num_heads=s.num_heads,
            scale=s.scale,
            input_layout="BSND",
            num_key_value_heads=s.num_kv_heads,
            block_size=key.shape[1],
            **kwargs,
        )
        return out

    def forward_decode(self, q, k, v, cache, meta):
        key, value = self._write_kv(k, v, cache, meta)
        query = q.to(key.dtype).unsqueeze(1).contiguous()  # [B, 1, N, D]
        out = self._attend(query, key, value, meta, [1] * q.shape[0], causal=False)
        return out.reshape(q.shape[0], q.shape[1], -1).to(q.dtype)

    def forward_extend(self, q, k, v, cache, meta):
        key, value = self._write_kv(k, v, cache, meta)
        lens = list(meta.extend_lens_cpu)
        rows, longest = padded_rows(lens)
        rows = rows.to(q.device)
        heads, dim = q.shape[1], q.shape[2]
        padded = q.new_zeros(len(lens) * longest, heads, dim, dtype=key.dtype)
        padded.index_copy_(0, rows, q.to(key.dtype))
        query = padded.view(len(lens), longest, heads, dim)
        out = self._attend(query, key, value, meta, lens, causal=True)
        return out.reshape(len(lens) * longest, heads, -1).index_select(0, rows).to(q.dtype)


class NpuMLAAttention(ReferenceMLAAttention):
    """MLA on npu: the torch reference (see the module docstring for why the fused MLA form of
    npu_fused_infer_attention_score is not used with dsserve's interleaved latent cache)."""

    upcast_half = False


# ------------------------------------------------------------------------------------------ MoE


class NpuMoE(MoEBackend):
    """Routing by npu_moe_gating_top_k_softmax (softmax + greedy); experts by init_routing ->
    grouped_matmul -> SiLU-and-mul -> grouped_matmul -> finalize_routing."""

    @staticmethod
    def unsupported(spec: MoESpec) -> str | None:
        if spec.quant != "none":
            return f"quantized experts ({spec.quant})"
        if spec.dtype not in _HALF:
            return f"dtype {spec.dtype} (float16/bfloat16 only)"
        if spec.top_k > 1024 or spec.top_k > spec.num_experts:
            return f"top_k {spec.top_k}"
        return None

    @classmethod
    def supports(cls, spec: MoESpec) -> bool:
        return cls.unsupported(spec) is None

    @staticmethod
    def fused_gating(spec: MoESpec) -> bool:
        """Whether npu_moe_gating_top_k_softmax computes this spec's selection."""
        return spec.scoring_func == "softmax" and (
            spec.topk_method == "greedy" or spec.n_group <= 1 or spec.topk_group >= spec.n_group)

    def select_experts(self, router_logits, correction_bias):
        s = self.spec
        if not self.fused_gating(s) or (s.topk_method == "noaux_tc" and correction_bias is not None):
            return select_experts(router_logits, correction_bias, s)
        weights, ids, _ = _npu().npu_moe_gating_top_k_softmax(router_logits.float().contiguous(), None, s.top_k)
        weights = weights.float()
        if s.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * s.routed_scaling_factor, ids.to(torch.int64)

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        if topk_ids.shape[0] == 0:
            return hidden.new_zeros(0, hidden.shape[1])
        # npu_moe_init_routing takes at most 2^24 input elements (2,340 tokens at DeepSeek-V3's 7168)
        step = routing_chunk_tokens(hidden.shape[1])
        if topk_ids.shape[0] <= step:
            return self._experts(hidden, topk_weights, topk_ids, w13, w2)
        return torch.cat([self._experts(hidden[t:t + step], topk_weights[t:t + step], topk_ids[t:t + step], w13, w2)
                          for t in range(0, topk_ids.shape[0], step)])

    def _experts(self, hidden, topk_weights, topk_ids, w13, w2):
        npu = _npu()
        tokens, k = topk_ids.shape
        ids32 = topk_ids.to(torch.int32).contiguous()
        row_idx = routing_row_idx(tokens, k).to(hidden.device)
        x = hidden.to(w13.dtype).contiguous()
        expanded_x, expanded_row_idx, expanded_ids = npu.npu_moe_init_routing(x, row_idx, ids32, tokens)
        group_list = expert_cumsum(expanded_ids, w13.shape[0])
        gate_up = npu.npu_grouped_matmul([expanded_x], [w13.transpose(1, 2)], group_list=group_list,
                                         split_item=2, group_type=0, group_list_type=0)[0]
        inter = w13.shape[1] // 2
        act = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(w2.dtype)
        down = npu.npu_grouped_matmul([act], [w2.transpose(1, 2)], group_list=group_list,
                                      split_item=2, group_type=0, group_list_type=0)[0]
        out = npu.npu_moe_finalize_routing(down, None, None, None, topk_weights.to(down.dtype),
                                           expanded_row_idx, ids32)
        return out.to(hidden.dtype)
