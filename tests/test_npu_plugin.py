"""The npu plugin without torch_npu: lazy import, fallbacks to the reference, argument builders."""
from __future__ import annotations

import subprocess
import sys

import dsserve.plugins.npu as npu_plugin
import pytest
import torch
from dsserve.core.backends import AttentionSpec, MoESpec
from dsserve.core.forward_batch import AttentionMetadata
from dsserve.core.plugins import PluginRegistry
from dsserve.plugins.npu import NpuDevice, kernels


def _mha(**kw):
    base = dict(  # noqa: C408 -- keyword form mirrors the spec fields
        kind="mha", num_heads=8, num_kv_heads=2, head_dim=128, v_head_dim=128, scale=0.1,
                dtype=torch.bfloat16, page_size=128)
    base.update(kw)
    return AttentionSpec(**base)


def _moe(**kw):
    base = dict(  # noqa: C408 -- keyword form mirrors the spec fields
        num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, scoring_func="softmax",
                topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                routed_scaling_factor=1.0, dtype=torch.bfloat16)
    base.update(kw)
    return MoESpec(**base)


def test_importing_the_plugin_and_kernels_imports_no_torch_npu():
    code = ("import sys, dsserve.plugins.npu, dsserve.plugins.npu.kernels\n"
            "assert 'torch_npu' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_registry_asks_the_npu_plugin_only_for_npu():
    """Its hooks need no device check: the registry routes only npu's ops to it."""
    registry = PluginRegistry(overrides=[])
    devices = {d.name: d for d, _ in registry.devices()}
    assert "npu" in registry.plugins_for(devices["npu"])
    assert "npu" not in registry.plugins_for(devices["cpu"])


@pytest.mark.skipif(npu_plugin.torch_npu_problem() is None, reason="torch_npu importable here")
def test_hooks_defer_to_the_reference_without_torch_npu():
    dev = NpuDevice()
    assert npu_plugin.torch_npu_problem() == "torch_npu is not installed"
    assert npu_plugin.dsserve_attention_backend(dev, _mha()) is None
    mla = AttentionSpec(kind="mla", num_heads=16, num_kv_heads=1, head_dim=192, v_head_dim=128, scale=0.1,
                        dtype=torch.bfloat16, kv_lora_rank=512, qk_rope_head_dim=64)
    assert npu_plugin.dsserve_attention_backend(dev, mla) is None
    assert npu_plugin.dsserve_moe_backend(dev, _moe()) is None
    assert npu_plugin.dsserve_communicator(dev, None, 0, 1) is not None  # torch.distributed, HCCL group


def test_mha_supports():
    s = kernels.NpuMHAAttention
    assert s.supports(_mha())
    assert s.supports(_mha(page_size=None, dtype=torch.float16))
    assert s.supports(_mha(page_size=512))
    assert "page size 64" in s.unsupported(_mha(page_size=64))
    assert "page size 192" in s.unsupported(_mha(page_size=192))
    assert "float16/bfloat16" in s.unsupported(_mha(dtype=torch.float32))
    assert "v_head_dim" in s.unsupported(_mha(v_head_dim=64))
    assert "multiple of 16" in s.unsupported(_mha(head_dim=72, v_head_dim=72))
    assert "group" in s.unsupported(_mha(num_heads=130, num_kv_heads=2))
    assert s.unsupported(_mha(kind="mla")) == "kind 'mla'"
    assert kernels.NpuMHAAttention(_mha(page_size=None)).page_size == 128


def test_moe_supports_and_gating_choice():
    m = kernels.NpuMoE
    assert m.supports(_moe()) and m.fused_gating(_moe())
    assert "float16/bfloat16" in m.unsupported(_moe(dtype=torch.float32))
    assert "quantized" in m.unsupported(_moe(quant="fp8_block"))
    assert not m.fused_gating(_moe(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2))
    assert not m.fused_gating(_moe(topk_method="group_limited_greedy", n_group=4, topk_group=2))
    assert m.fused_gating(_moe(topk_method="group_limited_greedy", n_group=1, topk_group=1))


def test_attention_argument_builders():
    meta = AttentionMetadata.build(prefix_lens=[0, 5, 2], extend_lens=[3, 1, 2],
                                   page_table=[[4], [7, 1], [2]], page_size=4, device="cpu")
    assert kernels.fia_lengths(meta) == ([3, 1, 2], [3, 6, 4])
    table = kernels.block_table(meta)
    assert table.dtype == torch.int32 and table.tolist() == [[4, 0], [7, 1], [2, 0]]
    rows, longest = kernels.padded_rows([3, 1, 2])
    assert longest == 3 and rows.tolist() == [0, 1, 2, 3, 6, 7]
    rows, longest = kernels.padded_rows([1, 1])
    assert longest == 1 and rows.tolist() == [0, 1]


def test_moe_routing_bookkeeping():
    # documented: row_idx = arange(T*k).reshape(k, T).T -> entry [t, j] = j*T + t
    assert kernels.routing_row_idx(3, 2).tolist() == [[0, 3], [1, 4], [2, 5]]
    assert kernels.routing_row_idx(3, 2).dtype == torch.int32
    sorted_ids = torch.tensor([0, 0, 2, 2, 2, 5], dtype=torch.int32)
    assert kernels.expert_cumsum(sorted_ids, 6).tolist() == [2, 2, 5, 5, 5, 6]


def test_moe_routing_is_chunked_under_the_ops_input_bound():
    # npu_moe_init_routing takes fewer than 2^24 input elements: 2,340 tokens of DeepSeek-V3's 7168
    assert kernels.routing_chunk_tokens(7168) == 2340
    assert 2340 * 7168 < 2 ** 24 < 2341 * 7168
    assert kernels.routing_chunk_tokens(2 ** 25) == 1
