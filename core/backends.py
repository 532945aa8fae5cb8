"""The types a device plugin returns from its hooks (see `hookspecs.py`).

Each hook receives a frozen *spec* describing what the model needs and returns a backend object
implementing one of the base classes below. Shapes use T = tokens in the pass, B = sequences,
H = query heads on this rank, E = routed experts, k = experts per token.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch

from .forward_batch import AttentionMetadata

# ----------------------------------------------------------------------------------------- devices


class Device(ABC):
    """One kind of accelerator (or the host CPU) a plugin can run the model on.

    name:          the `--device` value (`cpu`, `cuda`, `rocm`, `npu`, ...).
    torch_type:    the torch device type tensors live on (`rocm` runs on torch's "cuda" type).
    dist_backend:  the torch.distributed backend for its process groups.
    priority:      higher wins when the user names no device and several are available.
    memory_per_node: `memory_info` reports memory every rank on the node shares (the host's RAM),
                   not one device's: each of a node's ranks sizes its KV pool from its share.
    """

    name: str
    torch_type: str
    dist_backend: str
    priority: int = 0
    memory_per_node: bool = False

    @abstractmethod
    def is_available(self) -> tuple[bool, str]:
        """(True, "") when usable here, else (False, a one-line reason a user can act on)."""

    @abstractmethod
    def default_dtype(self) -> torch.dtype:
        """The compute dtype used when the user asks for `--dtype auto`."""

    @abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the memory the KV cache and weights are placed in."""

    def setup(self, local_rank: int = 0, ranks_on_node: int = 1) -> None:
        """Prepare the process of rank `local_rank` (of `ranks_on_node` on this node) for this device
        (its current device; on a CPU, its cores and threads); called once at start."""

    def describe(self) -> str:
        """A short human description for the startup log (model name, dtype choice)."""
        return self.name

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.torch_type) if self.torch_type == "cpu" else torch.device(
            self.torch_type, local_rank
        )


# --------------------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class AttentionSpec:
    """What a layer's attention looks like.

    kind="mla": DeepSeek multi-head latent attention. The cache holds one latent "head" per token of
      `kv_lora_rank + qk_rope_head_dim` elements: the normalised compressed KV followed by the
      rotated shared key. `head_dim` is `qk_nope_head_dim + qk_rope_head_dim`.
    kind="mha": standard (grouped-query) attention; the cache holds K and V per KV head.
    `scale` is the softmax scale (YaRN's mscale correction already applied).
    `dtype` is the KV cache's dtype (it may differ from the queries', e.g. an fp8 cache); outputs
    are in the queries' dtype. `page_size` None lets the backend choose.
    `kv_scale` is the cache's per-tensor scale: a cached element holds the real value / kv_scale
    (clamped to the format's finite range for 8-bit floats), and reads back as stored * kv_scale.
    1.0 unless a checkpoint calibrated one; a backend that cannot apply it declines specs with
    another value. A backend whose kernels do not read an 8-bit cache (`fp8_cache`) declines the
    spec and lets the reference serve it.
    `batch_invariant` (--enable-deterministic-inference): a sequence's output must depend on its own
    cached tokens and query only, never on the other sequences of the pass (their number, lengths or
    values): KV splits and reduction orders fixed per sequence. The model then runs every pass as
    decode (`AttentionMetadata.per_token`), so extend is not called.
    """

    kind: Literal["mla", "mha"]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    dtype: torch.dtype
    page_size: int | None = None
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    kv_scale: float = 1.0
    batch_invariant: bool = False

    @property
    def fp8_cache(self) -> bool:
        """Whether the cache holds 8-bit floats (e4m3 or e5m2), which the queries never are."""
        return self.dtype.is_floating_point and self.dtype.itemsize == 1

    @property
    def qk_nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def kv_elements_per_token(self) -> int:
        """Cache elements one token costs in one layer."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_kv_heads * (self.head_dim + self.v_head_dim)


class AttentionBackend(ABC):
    """Attention over a paged KV cache for one `AttentionSpec`.

    The model calls `prepare(meta)` once per forward pass, then `forward_extend` or
    `forward_decode` once per layer. Both first write the new tokens' KV into `cache` at
    `meta.out_cache_loc`, then attend causally over each sequence's whole cached context
    (`meta.seq_lens`), prefix included.
    """

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @property
    def page_size(self) -> int:
        """Tokens per KV page; the spec's value when given."""
        return self.spec.page_size or 16

    def create_cache(self, num_pages: int, device: torch.device) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Allocate one layer's cache in the standard layout.

        mla: [num_pages, page_size, kv_lora_rank + qk_rope_head_dim].
        mha: (k [num_pages, page_size, num_kv_heads, head_dim], v [..., v_head_dim]).
        """
        s, p = self.spec, self.page_size
        if s.kind == "mla":
            return torch.zeros(num_pages, p, s.kv_elements_per_token, dtype=s.dtype, device=device)
        return (
            torch.zeros(num_pages, p, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=device),
            torch.zeros(num_pages, p, s.num_kv_heads, s.v_head_dim, dtype=s.dtype, device=device),
        )

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-pass precomputation shared by all layers (index tensors, split plans). Optional."""


class MLAAttentionBackend(AttentionBackend):
    """Multi-head latent attention. Queries arrive with RoPE applied to their rope part.

    Decode works in latent space: the model asks `absorb_query` for q_latent, `forward_decode` for
    the attention-weighted latent, and `expand_output` for the heads' values. `w_kc`/`w_vc` reach
    every method as `process_weights_after_loading` returned them (as loaded, by default).
    """

    def process_weights_after_loading(self, w_kc: torch.Tensor, w_vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called once per layer with kv_b_proj's halves, w_kc [H, qk_nope_head_dim, kv_lora_rank] and
        w_vc [H, kv_lora_rank, v_head_dim]; returns them in the layout this backend's methods want.
        Default: unchanged."""
        return w_kc, w_vc

    def absorb_query(self, q_nope: torch.Tensor, w_kc: torch.Tensor) -> torch.Tensor:
        """q_latent [B, H, kv_lora_rank] = q_nope [B, H, qk_nope_head_dim] @ w_kc per head."""
        return torch.bmm(q_nope.transpose(0, 1), w_kc).transpose(0, 1)

    def expand_output(self, o_latent: torch.Tensor, w_vc: torch.Tensor) -> torch.Tensor:
        """[B, H, v_head_dim] = o_latent [B, H, kv_lora_rank] @ w_vc per head."""
        return torch.bmm(o_latent.transpose(0, 1), w_vc).transpose(0, 1)

    @abstractmethod
    def forward_extend(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
        w_kc: torch.Tensor,
        w_vc: torch.Tensor,
    ) -> torch.Tensor:
        """Prefill / chunked prefill. May expand the latent into per-head K and V.

        q_nope [T, H, qk_nope_head_dim], q_pe [T, H, qk_rope_head_dim];
        latent [T, kv_lora_rank + qk_rope_head_dim], the new tokens' cache entries;
        w_kc [H, qk_nope_head_dim, kv_lora_rank] and w_vc [H, kv_lora_rank, v_head_dim] as loaded, the
        halves of kv_b_proj (k_nope = latent_c @ w_kc^T per head, v = latent_c @ w_vc), in the layout
        `process_weights_after_loading` returned.
        Returns [T, H, v_head_dim].
        """

    @abstractmethod
    def forward_decode(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """One new token per sequence, attending in latent space with the absorbed query.

        q_latent [B, H, kv_lora_rank] (`absorb_query`'s), q_pe [B, H, qk_rope_head_dim],
        latent [B, kv_lora_rank + qk_rope_head_dim]. Scores are `q_latent . c + q_pe . k_pe` times
        `spec.scale`. Returns the attention-weighted latent [B, H, kv_lora_rank] (`expand_output` takes it).
        """


class MHAAttentionBackend(AttentionBackend):
    """Multi-head / grouped-query attention; query head h reads KV head h // (H / num_kv_heads)."""

    @abstractmethod
    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, H, head_dim], k [T, num_kv_heads, head_dim], v [T, num_kv_heads, v_head_dim] with RoPE
        applied. Returns [T, H, v_head_dim]."""

    @abstractmethod
    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """As `forward_extend` with exactly one token per sequence (T == B)."""


# --------------------------------------------------------------------------------------------- MoE


@dataclass(frozen=True)
class MoESpec:
    """A routed-expert layer.

    scoring_func: "softmax" or "sigmoid" over the router logits.
    topk_method:  "greedy" (plain top-k), "group_limited_greedy" (keep the `topk_group` groups with the
                  highest max score), "noaux_tc" (add `e_score_correction_bias` for selection only; keep
                  the groups with the highest sum of their top-2 biased scores).
    norm_topk_prob: renormalise the chosen weights to sum to 1 before `routed_scaling_factor`.
    intermediate_size is per expert on this rank.
    quant / weight_block_size: the experts' weight format, as `LinearSpec`'s ("none" or a
    `dsserve.core.quant.FORMATS` name); quantized experts reach the backend as stored (see
    `MoEBackend.compute_experts`).
    batch_invariant (--enable-deterministic-inference): a token's output must be the same bits
    whatever other tokens share its experts in the call.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    scoring_func: Literal["softmax", "sigmoid"]
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"]
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    dtype: torch.dtype
    quant: str = "none"
    weight_block_size: tuple[int, int] | None = None
    batch_invariant: bool = False


class MoEBackend(ABC):
    """Expert routing and routed-expert compute for one `MoESpec` (shared experts are a plain MLP)."""

    def __init__(self, spec: MoESpec):
        self.spec = spec

    @abstractmethod
    def select_experts(
        self, router_logits: torch.Tensor, correction_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [T, E] float32; correction_bias [E] float32 (noaux_tc only).

        Returns (topk_weights [T, k] float32, scaled and normalised as the spec says,
        topk_ids [T, k] int64). The order of the k entries within a row is free.
        """

    def process_weights_after_loading(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called once after loading with the experts' weights as stored (shapes below); returns the
        (w13, w2) that `compute_experts` receives from then on, in whatever layout its kernels want
        (packed blocks, say). Default: unchanged."""
        return w13, w2

    @abstractmethod
    def compute_experts(
        self,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
    ) -> torch.Tensor:
        """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t]) for every token t.

        hidden [T, hidden_size]; topk_* as `select_experts` returns them. w13 and w2 as
        `process_weights_after_loading` returned them; as stored, w13 is [E, 2 * intermediate_size,
        hidden_size] (gate rows, then up rows) and w2 [E, hidden_size, intermediate_size];
        expert(x) = w2 @ (silu(gate x) * (up x)). Returns [T, hidden_size] in hidden's dtype.

        Quantized experts (spec.quant != "none") are stored as dicts instead: the format's tensors
        (`dsserve.core.quant.weight_format(spec.quant, spec.weight_block_size).tensors()`) of each
        expert's [2 * intermediate_size, hidden_size] gate+up weight (gate rows first, along the
        tensor's output dim) and of its [hidden_size, intermediate_size] down weight, stacked over
        experts: e.g. fp8_block's w13 = {"weight": [E, 2I, D] e4m3, "weight_scale_inv": [E, 2I/bn,
        D/bk] float32}. The scheme's activation rounding applies to both GEMMs' inputs.
        """


# --------------------------------------------------------------------------------- quantized GEMM


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer y = x W^T (+ b) of this rank's shard.

    quant: "none" or a weight format of `dsserve.core.quant.FORMATS`, stored as the published
    checkpoints store it (docs/quantization.md): "fp8_block" (e4m3 `weight` + float32
    `weight_scale_inv` per block, activations e4m3 per token per block column), "int8_block" (the
    same in int8), "int8_channel" (int8 `weight` + float32 `weight_scale` [out, 1], activations int8
    per token), "awq" (4-bit `qweight`/`qzeros`/`scales`, transposed, activations unquantized).
    weight_block_size: the scale block (rows, columns); AWQ's is (1, group_size).
    batch_invariant (--enable-deterministic-inference): each output row must be the same bits whatever
    the other rows of the call (a fixed reduction order over K whatever the number of rows).
    """

    in_features: int
    out_features: int
    bias: bool
    dtype: torch.dtype
    quant: str = "none"
    weight_block_size: tuple[int, int] | None = None
    batch_invariant: bool = False


class LinearMethod(ABC):
    """How one quantization scheme creates, post-processes and applies a linear layer's weights.

    Layout of the created tensors (what the model's `Linear` relies on to load them): each one is laid
    out along the weight's own axes, `param_dims(name)` saying which of its dims follows the output
    features and which the input features ((0, 1) unless the format stores it transposed, as AWQ
    does), and `param_block(name)` how many weight rows and columns one of its elements covers: (1, 1)
    for the weight and a bias, the block for a block scale (fp8_block's `weight_scale_inv` covers
    `weight_block_size`), (1, 0) for a per-row scale [out, 1] (0: all columns). `Linear` slices
    checkpoint tensors in those units when it merges several of them into one layer (gate_proj +
    up_proj) and when it shards a layer over tensor-parallel ranks (columns: the output dim; rows:
    the input dim of the 2-D tensors; a per-row scale is kept whole); a part or shard boundary that
    falls inside a block is refused when the model is built.
    """

    def __init__(self, spec: LinearSpec):
        self.spec = spec

    @abstractmethod
    def create_weights(self) -> dict[str, torch.Tensor]:
        """Empty tensors named as in the checkpoint ("weight", "bias", "weight_scale_inv", ...),
        shaped as the checkpoint stores this shard. The loader fills them in place."""

    def param_block(self, name: str) -> tuple[int, int]:
        """(weight rows, weight columns) one element of the created tensor `name` covers; columns 0
        means all of them. Default (1, 1): every tensor is element for element with the weight."""
        return (1, 1)

    def param_dims(self, name: str) -> tuple[int, int]:
        """(the dim of tensor `name` that follows the output features, the one that follows the input
        features). Default (0, 1); a 1-D tensor follows the output features."""
        return (0, 1)

    def process_weights_after_loading(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Repack loaded tensors for `apply` (transpose, convert, pre-quantize). Default: unchanged."""
        return params

    @abstractmethod
    def apply(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""

    def dequantized_weight(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The real weight W [out_features, in_features] in a floating dtype of the method's choice
        (callers cast), from the params `process_weights_after_loading` returned; no bias. Used where
        the model needs the weight itself rather than x W^T (MLA's absorbed kv_b_proj halves). Default:
        `params["weight"]`, right for an unquantized method that keeps the [out, in] layout; a
        quantized method (or one that repacks the weight) overrides it."""
        if self.spec.quant != "none":
            raise NotImplementedError(
                f"{type(self).__name__} (quant {self.spec.quant!r}) does not implement dequantized_weight")
        return params["weight"]


# -------------------------------------------------------------------------------------- layer ops


class LayerOps(ABC):
    """The small ops between a layer's big kernels: RMSNorm (with the residual add fused into it) and
    rotary embedding. At decode each handles a few hundred values, so what they cost is dispatch, not
    arithmetic (eight layers run about a hundred of them a step): a device that fuses them keeps a
    step's op count down. One instance serves every layer of the model.
    """

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, D] * rsqrt(mean(x^2) + eps) * weight [D], in float32, rounded once to x's dtype.

        With `residual` [rows, D]: `residual` becomes x + residual (in place, rounded to x's dtype, as
        the unfused `residual = residual + x` is) and the norm of that is returned. `out` [rows, D]
        receives the result (it may be x itself); None returns a new tensor. Rows of x, residual and
        out may be strided (a slice of a wider projection); the last dim is contiguous.
        """

    @abstractmethod
    def rotary_(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                interleaved: bool) -> None:
        """Rotate x [T, heads, D] in place by the angles of positions [T] (int64).

        cos, sin: float32 [max_positions, D / 2]. interleaved=True rotates adjacent pairs (x[2i],
        x[2i+1]) (DeepSeek's layout), False the halves (x[i], x[i + D/2]) (Llama/Qwen2). Computed in
        float32, rounded once. x may be a strided view (q's rope part inside q); its last dim is
        contiguous.
        """


# ---------------------------------------------------------------------------------- communication


@dataclass
class Communicator(ABC):
    """Collectives over one process group (tensor-parallel ranks)."""

    rank: int = 0
    world_size: int = 1
    group: object = field(default=None, repr=False)

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group; returns the sum (may be x itself, reduced in place)."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along `dim`, in rank order."""

    @abstractmethod
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every rank receives rank `src`'s x (in place); returns it."""
