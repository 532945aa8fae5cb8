"""Expert routing and routed-expert compute in plain torch.

Routing follows the published DeepSeek checkpoints (the same arithmetic as Hugging Face's
DeepseekV2/V3 routers), because every plugin's routing must pick exactly these experts. Expert
compute groups tokens by expert so each expert costs two GEMMs, however many tokens it gets;
quantized experts (every format of `dsserve.core.quant`) are computed as stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import MoEBackend, MoESpec
from ..quant import weight_format

_HALF = (torch.float16, torch.bfloat16)


def select_experts(
    router_logits: torch.Tensor, correction_bias: torch.Tensor | None, spec: MoESpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, ids [T, k] int64) for `spec`; see `MoEBackend.select_experts`."""
    logits = router_logits.float()
    if spec.scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif spec.scoring_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown scoring_func {spec.scoring_func!r}")

    method = spec.topk_method
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"unknown topk_method {method!r}")
    choice = scores
    if method == "noaux_tc" and correction_bias is not None:
        # The bias steers selection only; the weights stay the unbiased scores.
        choice = scores + correction_bias.float()

    tokens, experts = scores.shape
    groups = spec.n_group
    if method != "greedy" and groups > 1 and spec.topk_group < groups:
        if experts % groups:
            raise ValueError(f"{experts} experts do not split into {groups} groups")
        per_group = experts // groups
        grouped = choice.view(tokens, groups, per_group)
        if method == "group_limited_greedy":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(spec.topk_group, dim=-1).indices
        keep = torch.zeros(tokens, groups, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, kept, True)
        keep = keep[:, :, None].expand(tokens, groups, per_group).reshape(tokens, experts)
        choice = choice.masked_fill(~keep, float("-inf"))

    ids = choice.topk(spec.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    # Scaled always. DeepSeek-V2's remote code skips the scaling when it normalises, but no
    # published V2 checkpoint sets norm_topk_prob, and V3's code scales after normalising.
    weights = weights * spec.routed_scaling_factor
    return weights, ids.to(torch.int64)


class ReferenceMoE(MoEBackend):
    """Routing by `select_experts`; each expert's tokens in two GEMMs. Quantized experts stay as
    stored and are dequantised one expert at a time (float32 temporaries of one expert, never the
    layer), their inputs rounded as the scheme rounds activations, as `ReferenceQuantizedLinear`."""

    def __init__(self, spec: MoESpec):
        super().__init__(spec)
        self.format = weight_format(spec.quant, spec.weight_block_size) if spec.quant != "none" else None

    def select_experts(self, router_logits, correction_bias):
        return select_experts(router_logits, correction_bias, self.spec)

    def _gemm(self, x: torch.Tensor, w, expert: int) -> torch.Tensor:
        """x [n, in] @ expert's weight^T; w a stacked tensor (x enters in its dtype, as kernels take
        it), or a quantized format's dict of them."""
        if self.format is None:
            return torch.matmul(x.to(w.dtype), w[expert].t())
        weight = self.format.dequantize({name: t[expert] for name, t in w.items()})
        return self.format.round_activations(x.float()) @ weight.t()

    def compute_experts(self, hidden, topk_weights, topk_ids, w13, w2):
        tokens, k = topk_ids.shape
        acc_dtype = torch.float32 if hidden.dtype in _HALF or self.format else hidden.dtype
        out = torch.zeros(tokens, hidden.shape[1], dtype=acc_dtype, device=hidden.device)
        if tokens == 0:
            return out.to(hidden.dtype)
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // k  # token of each (token, expert) pair, grouped by expert
        weight_of = topk_weights.reshape(-1)[order].to(acc_dtype)
        counts = torch.bincount(flat_ids, minlength=self.spec.num_experts).tolist()
        inter = self.spec.intermediate_size
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            start += count
            tok = token_of[rows]
            gate_up = self._gemm(hidden.index_select(0, tok), w13, expert)  # [n, 2 * inter]
            act = F.silu(gate_up[:, :inter].to(acc_dtype)) * gate_up[:, inter:].to(acc_dtype)
            y = self._gemm(act, w2, expert).to(acc_dtype)
            out.index_add_(0, tok, y * weight_of[rows, None])
        return out.to(hidden.dtype)
