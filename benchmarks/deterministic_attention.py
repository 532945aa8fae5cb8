"""What --enable-deterministic-inference costs MLA prefill attention on the cpu plugin: one prompt at the
bench model's dims (16 heads, kv_lora 512 + rope 64), through the extend path and through the mode's
per-token decode path (absorb the query, the decode kernel on `AttentionMetadata.per_token()`, expand),
alternated, best of `--repeats`; the load average is printed beside.

    python benchmarks/deterministic_attention.py --threads 2 [--tokens 512] [--dtype float32 bfloat16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from dsserve.bench.common import format_table, set_threads
from dsserve.core.backends import AttentionSpec
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.plugins.cpu import native
from dsserve.plugins.cpu.attention import CpuMLAAttention

HEADS, NOPE, ROPE, RANK, V, PAGE = 16, 128, 64, 512, 128, 16


def backend(dtype: torch.dtype, batch_invariant: bool) -> CpuMLAAttention:
    spec = AttentionSpec(kind="mla", num_heads=HEADS, num_kv_heads=1, head_dim=NOPE + ROPE, v_head_dim=V,
                         scale=(NOPE + ROPE) ** -0.5, dtype=dtype, page_size=PAGE, kv_lora_rank=RANK,
                         qk_rope_head_dim=ROPE, batch_invariant=batch_invariant)
    return CpuMLAAttention(spec, native.kernels(), native.isa())


def measure(dtype: torch.dtype, tokens: int, repeats: int) -> dict[str, float]:
    fast, exact = backend(dtype, False), backend(dtype, True)
    w_kc, w_vc = fast.process_weights_after_loading(torch.randn(HEADS, NOPE, RANK, dtype=dtype) * 0.05,
                                                    torch.randn(HEADS, RANK, V, dtype=dtype) * 0.05)
    pages = -(-tokens // PAGE)
    meta = AttentionMetadata.build(prefix_lens=[0], extend_lens=[tokens], page_table=[list(range(1, pages + 1))],
                                   page_size=PAGE, device="cpu")
    per_token = meta.per_token()
    cache = torch.zeros(pages + 1, PAGE, RANK + ROPE, dtype=dtype)
    q_nope, q_pe = torch.randn(tokens, HEADS, NOPE, dtype=dtype), torch.randn(tokens, HEADS, ROPE, dtype=dtype)
    latent = torch.randn(tokens, RANK + ROPE, dtype=dtype)

    def extend():
        fast.prepare(meta)
        fast.forward_extend(q_nope, q_pe, latent, cache, meta, w_kc, w_vc)

    def deterministic():
        exact.prepare(per_token)
        o = exact.forward_decode(exact.absorb_query(q_nope, w_kc), q_pe, latent, cache, per_token)
        exact.expand_output(o, w_vc)

    best = {"extend": float("inf"), "per-token decode": float("inf")}
    for _ in range(repeats):
        for name, run in (("extend", extend), ("per-token decode", deterministic)):
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    ns = parser.parse_args()
    threads = set_threads(ns.threads)
    if native.kernels() is None:
        print("the cpu plugin's C++ kernels are not available here", file=sys.stderr)
        return 1
    rows = []
    for name in ns.dtype:
        best = measure(getattr(torch, name), ns.tokens, ns.repeats)
        rows.append([name, best["extend"] * 1e3, best["per-token decode"] * 1e3,
                     best["per-token decode"] / best["extend"]])
    print(format_table(["dtype", "extend ms", "deterministic ms", "ratio"], rows,
                       title=(f"MLA prefill attention, {ns.tokens} tokens, {threads} threads, kernels "
                              f"{native.isa().name}; load average {os.getloadavg()[0]:.2f}")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
