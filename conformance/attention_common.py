"""Attention specs, shapes and the standard cache layout, shared by the attention and paged-KV checks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from dsserve.conformance.harness import Case
from dsserve.core.backends import AttentionSpec


@dataclass(frozen=True)
class Batch:
    """Per-sequence cached-prefix and new-token counts of one forward pass."""

    name: str
    prefix: tuple[int, ...]
    extend: tuple[int, ...]


# Extend passes: a plain ragged prefill (one 1-token prompt), sequences with cached prefixes (one
# exactly a page of 64, one ending mid-page), and prefill mixed with one-token extends.
EXTEND_BATCHES = (
    Batch("prefill-ragged", (0, 0, 0, 0), (1, 7, 16, 37)),
    Batch("prefix-cached", (5, 16, 33, 64), (9, 3, 12, 2)),
    Batch("mixed", (0, 20, 0, 41), (11, 1, 5, 1)),
)
# Decode passes: contexts of 1 token, at and across page boundaries; a long context beside a short one.
DECODE_BATCHES = (
    Batch("ragged", (0, 15, 16, 63, 64, 129), (1,) * 6),
    Batch("long", (700, 3), (1, 1)),
)
PAGE_SIZES = (1, 16, 64)

# The first shape of each kind runs every page size and batch; the others one page size and batch.
MLA_SHAPES = {
    "small": {"num_heads": 4, "nope": 16, "rope": 8, "rank": 32, "v": 16},
    "deepseek": {"num_heads": 16, "nope": 128, "rope": 64, "rank": 512, "v": 128},  # DeepSeek-V2/V3's dims
}
MHA_SHAPES = {
    "gqa": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 64, "v_head_dim": 64},
    "mha": {"num_heads": 4, "num_kv_heads": 4, "head_dim": 32, "v_head_dim": 32},
    "mqa-odd": {"num_heads": 6, "num_kv_heads": 1, "head_dim": 24, "v_head_dim": 16},
}
# The softmax scale is not head_dim ** -0.5 (as with YaRN's mscale): a backend must use spec.scale.
SCALE_FACTOR = 1.3

# 8-bit caches (`--kv-cache-dtype fp8_e4m3`): the cache in e4m3, the queries in each of these dtypes,
# on the last page size (every batch with kv_scale 1, the first batch with FP8_KV_SCALE too).
FP8_CACHE_DTYPE = torch.float8_e4m3fn
FP8_QUERY_DTYPES = ("float32", "bfloat16")
# A per-tensor scale a backend must apply. A power of two, so that dividing a query-dtype value by it
# is exact and every correct write stores the same e4m3 bits as the reference's `to_cache`.
FP8_KV_SCALE = 0.5


def make_spec(kind: str, shape: str, dtype: torch.dtype, page_size: int, kv_scale: float = 1.0) -> AttentionSpec:
    """`dtype` is the cache's (the queries' too, unless it is an 8-bit cache)."""
    if kind == "mla":
        s = MLA_SHAPES[shape]
        qk = s["nope"] + s["rope"]
        return AttentionSpec(kind="mla", num_heads=s["num_heads"], num_kv_heads=1, head_dim=qk,
                             v_head_dim=s["v"], scale=SCALE_FACTOR * qk ** -0.5, dtype=dtype,
                             page_size=page_size, kv_lora_rank=s["rank"], qk_rope_head_dim=s["rope"],
                             kv_scale=kv_scale)
    s = MHA_SHAPES[shape]
    return AttentionSpec(kind="mha", scale=SCALE_FACTOR * s["head_dim"] ** -0.5, dtype=dtype,
                         page_size=page_size, kv_scale=kv_scale, **s)


def cache_shapes(spec: AttentionSpec, num_pages: int) -> list[tuple[int, ...]]:
    """The standard layout `AttentionBackend.create_cache` documents."""
    p = spec.page_size
    if spec.kind == "mla":
        return [(num_pages, p, spec.kv_lora_rank + spec.qk_rope_head_dim)]
    return [(num_pages, p, spec.num_kv_heads, spec.head_dim), (num_pages, p, spec.num_kv_heads, spec.v_head_dim)]


def create_cache(case: Case, backend, spec: AttentionSpec, num_pages: int, device: torch.device):
    """The backend's cache, checked against the standard layout; a list of tensors."""
    with case.calling("create_cache"):
        cache = backend.create_cache(num_pages, device)
    parts = list(cache) if isinstance(cache, (tuple, list)) else [cache]
    want = cache_shapes(spec, num_pages)
    got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in parts]
    if got != want or any(t.dtype != spec.dtype or t.device.type != device.type for t in parts):
        case.fail(f"create_cache returned {got} "
                  f"({', '.join(sorted({str(t.dtype) for t in parts if isinstance(t, torch.Tensor)}))}), "
                  f"not the standard layout {want} in {spec.dtype} on {device.type}")
        case.done()
    return parts


def as_cache_arg(spec: AttentionSpec, parts: list[torch.Tensor]):
    return parts[0] if spec.kind == "mla" else (parts[0], parts[1])
