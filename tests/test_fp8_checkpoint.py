"""DeepSeek-V3/R1 FP8 block-quantized checkpoints load and run, end to end.

A small DeepSeek-V3 is built with transformers (tests/hf_checkpoints.py) at sizes where 128x128 blocks
matter (hidden 256, q/kv LoRA 128, kv_b_proj 2 heads x (64 + 64) = 256 rows, dense MLP 256, experts
128, kv_a_proj_with_mqa 128 + 64 = 192 rows: a partial block), then written the way DeepSeek publishes
it: every linear weight of attention, the dense MLP, the shared and the routed experts as
float8_e4m3fn with a float32 `<name>.weight_scale_inv` per 128x128 block (scale = block amax / 448),
embed_tokens / lm_head / norms / router gate in bfloat16, e_score_correction_bias in float32, and
config.json's quantization_config as in shared/reference/deepseek-v3.config.json.

The oracle is transformers with every weight replaced by its dequantised value (float32). dsserve
keeps the linear layers and the routed experts in FP8 as stored, and takes MLA's absorbed
kv_b_proj halves from the dequantised weight. With an FP8 method that leaves activations unquantized
its logits are the oracle's to float32 rounding (the loading is exact); with the reference W8A8 method
(activations rounded to e4m3 per token per 128 features, as DeepSeek-V3 runs) they differ by that
rounding, bounded at LOGIT_NERR and relative to the weight rounding the checkpoint itself carries.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsserve.core.quant import QuantConfig
from dsserve.core.reference import QuantizedWeights, ReferenceMoE
from hf_checkpoints import build_deepseek_v3, read_tensors, write_tensors

BLOCK = 128
FP8_MAX = 448.0
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}
# What DeepSeek quantizes: every projection of attention, dense MLPs, shared and routed experts.
QUANTIZED = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
SIZES = {
    "vocab_size": 512, "hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 128,
    "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 128,
    "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
}
# transformers' default initializer_range rather than hf_checkpoints' 0.1: with the sharper weights a
# random 3-layer model turns the e4m3 roundings into logit changes of the order of the logits' spread
# (measured at 0.1: normalised error up to 0.17, a third of the argmaxes flipped), which would test
# nothing; at 0.02 the rounding moves a top-2 margin by at most 0.19 logit std.
INIT_RANGE = 0.02
PROMPT_LENGTHS = (1, 5, 12, 23, 40)
NEW_TOKENS = 12
# Normalised squared logit error ||dsserve - oracle||^2 / ||oracle||^2 of the W8A8 reference. One e4m3
# rounding of a GEMM's input (3 mantissa bits: RMS relative error 2^-3 / sqrt(12) = 3.6%) costs about
# 1.3e-3 of normalised error (the conformance suite bounds one FP8 GEMM at 3e-3); on the way to the
# logits a token crosses 6 FP8 GEMMs per layer (q_a, q_b, kv_a, o_proj, gate_up, down of the dense
# MLP or shared experts) plus the routed experts' two, 22 in all in the two MoE layers' paths: about
# 2.9e-2 if the roundings added up without cancelling; they partly cancel. Measured: 7.4e-3 (8.0e-3
# in bfloat16; the weight rounding itself: 1.7e-2).
LOGIT_NERR = 2.5e-2


def quantize_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], float32 weight_scale_inv [ceil(N/128), ceil(K/128)]), one scale per
    block = block amax / 448, as DeepSeek's checkpoints are made."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
    return q.float() * s


def _write_fp8(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """The fp8 checkpoint in dst; returns the dequantised float32 tensors (the oracle's weights)."""
    shutil.copytree(src, dst)
    fp8, deq = {}, {}
    for name, t in read_tensors(src).items():
        if QUANTIZED.search(name):
            q, scale = quantize_blockwise(t)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            deq[name] = dequantize(q, scale)
        elif name.endswith("e_score_correction_bias"):
            fp8[name] = deq[name] = t.float()
        else:  # embeddings, lm_head, norms, router gate: bfloat16 as published
            fp8[name] = t.to(torch.bfloat16)
            deq[name] = fp8[name].float()
    write_tensors(dst, fp8)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = QUANTIZATION_CONFIG
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return deq


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(fp8 folder, oracle model, dequantised tensors, the float32 model the checkpoint was made from)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fp8")
    src = build_deepseek_v3(root / "float32", initializer_range=INIT_RANGE, **SIZES)
    deq = _write_fp8(src.path, root / "fp8")
    deq_dir = root / "dequantised"
    shutil.copytree(src.path, deq_dir)
    write_tensors(deq_dir, deq)
    oracle = AutoModelForCausalLM.from_pretrained(deq_dir, attn_implementation="eager", dtype=torch.float32).eval()
    return root / "fp8", oracle, deq, src.model


@pytest.fixture(scope="module")
def engine(ckpt):
    from dsserve import Engine

    # model_worker="thread": the tests read the model itself
    eng = Engine(model_path=str(ckpt[0]), device="cpu", dtype="float32", max_total_tokens=1024,
                 model_worker="thread")
    yield eng
    eng.shutdown()


class DequantizingFp8Linear(QuantizedWeights):
    """fp8_block with the weight dequantised and the activations left as they are (no W8A8 rounding):
    served through the model, its logits must be the oracle's to float32 rounding."""

    def apply(self, params, x):
        return torch.nn.functional.linear(x, self.dequantized_weight(params).to(x.dtype), params.get("bias"))


class DequantizingFp8MoE(ReferenceMoE):
    """The reference's fp8 experts with the activations left as they are, like DequantizingFp8Linear."""

    def __init__(self, spec):
        super().__init__(spec)
        self.format.round_activations = lambda x: x  # this instance's format only


@dataclass
class Runs:
    seqs: list[list[int]]  # each prompt followed by the oracle's greedy continuation
    oracle: list[torch.Tensor]  # the oracle's logits at every position of each sequence
    source: list[torch.Tensor]  # the float32 model the checkpoint was quantized from, same positions


@pytest.fixture(scope="module")
def runs(ckpt) -> Runs:
    oracle, source = ckpt[1], ckpt[3]
    gen = torch.Generator().manual_seed(7)
    seqs, want, src = [], [], []
    # One thread, as in test_model_parity: for these tiny models two contending OpenMP threads on a
    # busy machine were 40x slower (9 s against 0.2 s for 12 steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for n in PROMPT_LENGTHS:
                seq = torch.randint(2, SIZES["vocab_size"], (n,), generator=gen).tolist()
                for _ in range(NEW_TOKENS):  # the whole sequence recomputed at every step
                    seq.append(int(oracle(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
                seqs.append(seq)
                want.append(oracle(input_ids=torch.tensor([seq])).logits[0].float())
                src.append(source(input_ids=torch.tensor([seq])).logits[0].float())
    finally:
        torch.set_num_threads(threads)
    return Runs(seqs, want, src)


@pytest.fixture(scope="module")
def w8a8(engine, runs) -> list[torch.Tensor]:
    """dsserve's logits (float32; the cpu plugin's fp8 methods: the reference's W8A8, or the C++ kernels'
    weight-only path, which keeps activations unrounded) at every position of the sequences."""
    return [_prompt_logits(engine, seq) for seq in runs.seqs]


def _prompt_logits(engine, ids: list[int]) -> torch.Tensor:
    from dsserve.core.batch import BatchItem

    allocator = engine.scheduler.allocator   # the engine is idle: its pages are ours for a moment
    pages = allocator.alloc(allocator.pages_for(len(ids)))
    try:
        return engine.executor.runner.forward([BatchItem(ids, 0, pages, "all")])
    finally:
        allocator.free(pages)


def _nerr(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b||^2 / ||b||^2 over every row of every sequence."""
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    return num / sum(float(y.double().pow(2).sum()) for y in b)


# --------------------------------------------------------------------------------------------------
# the checkpoint is served as DeepSeek's is meant to be


def test_checkpoint_is_in_the_published_fp8_form(ckpt):
    path = ckpt[0]
    tensors = read_tensors(path)
    scaled = [n for n in tensors if n.endswith(".weight_scale_inv")]
    assert len(scaled) == 3 * 5 + 3 + 2 * 3 + 2 * 8 * 3  # attention, dense MLP, shared, routed experts
    for name in scaled:
        w = tensors[name.removesuffix("_scale_inv")]
        assert w.dtype == torch.float8_e4m3fn and tensors[name].dtype == torch.float32
        assert tuple(tensors[name].shape) == (-(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK))
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape[0] == 192  # a partial block
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_linears_and_experts_stay_fp8(engine, ckpt):
    """Whichever method serves them (the reference's, or a device kernel's repacking), every quantized
    linear keeps 1 byte per weight and gives back exactly the checkpoint's dequantised weight."""
    from dsserve.core.reference import QuantizedWeights
    from dsserve.models.layers import Linear, RoutedExperts

    deq = ckpt[2]
    model = engine.executor.runner.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    for name, lin in linears.items():
        if name == "lm_head" or name.endswith(".routed.gate"):  # unquantized in DeepSeek's FP8 release too
            assert lin.method.spec.quant == "none" and lin.method.spec.weight_block_size is None, name
            continue
        assert isinstance(lin.method, QuantizedWeights), name
        assert lin.method.spec.weight_block_size == (BLOCK, BLOCK)
        weights = [p for p in lin.params.values() if p.element_size() == 1]
        assert sum(p.numel() for p in weights) == lin.method.spec.out_features * lin.method.spec.in_features, name
        if name.endswith("kv_a_proj_with_mqa"):
            layer = name.split(".")[1]
            want = deq[f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight"]
            assert torch.equal(lin.method.dequantized_weight(dict(lin.params)), want)
    routed = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert len(routed) == 2
    for i, m in zip((1, 2), routed):
        assert m.spec.quant == "fp8_block" and m.w2["weight_scale_inv"].shape == (8, 2, 1)  # [E, D/128, I/128]
        w13, w2 = _stored_experts(m)
        for e in (0, 5):
            p = f"model.layers.{i}.mlp.experts.{e}."
            want = torch.cat([deq[p + "gate_proj.weight"], deq[p + "up_proj.weight"]])
            assert torch.equal(w13[e], want) and torch.equal(w2[e], deq[p + "down_proj.weight"])
    # the merged shared-expert gate/up: its scale rows come from both parts, in blocks
    shared = model.layers[1].mlp.shared_experts.gate_up_proj
    got = shared.method.dequantized_weight(dict(shared.params))
    p = "model.layers.1.mlp.shared_experts."
    assert torch.equal(got, torch.cat([deq[p + "gate_proj.weight"], deq[p + "up_proj.weight"]]))


def test_routed_experts_take_their_fp8_bytes_and_the_log_says_so(ckpt, runs, caplog):
    """Served in bfloat16 (the GPUs' dtype): the experts hold exactly the checkpoint's bytes (1 per
    weight plus float32 block scales; no dequantised copy), one log line gives the resident bytes, and
    the logits stay within the FP8 bound (bfloat16's own rounding, 2^-9, is far below e4m3's 2^-4)."""
    from dsserve import Engine
    from dsserve.models.layers import RoutedExperts

    E, I, D = SIZES["n_routed_experts"], SIZES["moe_intermediate_size"], SIZES["hidden_size"]
    stored = E * (3 * I * D + 4 * (2 * (I // BLOCK) * (D // BLOCK) + (D // BLOCK) * (I // BLOCK)))
    # a device kernel may add per-column copies of the scales (cpu: 4 bytes per row per 128 columns)
    most = stored + E * 4 * 3 * I * D // BLOCK
    with (caplog.at_level("INFO", logger="dsserve.loader"),
          Engine(model_path=str(ckpt[0]), device="cpu", dtype="bfloat16", max_total_tokens=1024,
                 model_worker="thread") as eng):
        for m in eng.executor.runner.model.modules():
            if isinstance(m, RoutedExperts):
                held = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n.startswith("w"))
                assert stored <= held <= most
        got = [_prompt_logits(eng, seq) for seq in runs.seqs]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("weights: ")]
    assert len(lines) == 1, lines
    assert "routed experts" in lines[0] and "fp8_block 128x128" in lines[0]
    err = _nerr(got, runs.oracle)
    print(f"\nbfloat16 fp8 normalised logit error {err:.1e}")
    assert err < LOGIT_NERR


def test_absorbed_mla_weights_are_the_dequantised_kv_b_proj(engine, ckpt):
    """w_kc / w_vc come from `dequantized_weight`; applying the fp8 method to an identity matrix (the
    former way) gives the same values with the reference's per-token activation scales, since each
    one-hot row quantizes exactly (448 is an e4m3 value)."""
    from dsserve.core.reference import ReferenceQuantizedLinear

    deq = ckpt[2]
    attn = engine.executor.runner.model.layers[2].self_attn
    _assert_absorbed(attn, deq["model.layers.2.self_attn.kv_b_proj.weight"].view(2, 128, 128))
    method, params = attn.kv_b_proj.method, dict(attn.kv_b_proj.params)
    via_identity = method.apply(params, torch.eye(128)).T
    want = method.dequantized_weight(params)
    if type(method) is ReferenceQuantizedLinear:
        assert torch.equal(via_identity, want)
    else:  # a device kernel whose output passes through bfloat16 (cpu's weight-only fp8 path)
        torch.testing.assert_close(via_identity, want, rtol=2 ** -8, atol=0)


# --------------------------------------------------------------------------------------------------
# against the oracle


def test_without_activation_rounding_the_model_is_the_oracle(ckpt, runs):
    """The loading itself is exact: with an fp8 method that keeps activations unquantized, every
    logit equals the dequantised oracle's to float32 rounding (measured: 1.7e-13 normalised)."""
    from dsserve.core.hookspecs import hookimpl
    from plugin_util import serving_cpu

    from dsserve import Engine

    class Dequantizing:
        @hookimpl(tryfirst=True)
        def dsserve_linear_method(self, device, spec):
            return DequantizingFp8Linear(spec) if spec.quant == "fp8_block" else None

        @hookimpl(tryfirst=True)
        def dsserve_moe_backend(self, device, spec):
            return DequantizingFp8MoE(spec) if spec.quant == "fp8_block" else None

    with serving_cpu(Dequantizing(), "dequantizing-fp8"), \
            Engine(model_path=str(ckpt[0]), device="cpu", dtype="float32", max_total_tokens=1024,
                   model_worker="thread") as eng:   # the plugin is in this process
        got = [_prompt_logits(eng, seq) for seq in runs.seqs]
    err = _nerr(got, runs.oracle)
    print(f"\nnormalised logit error without activation rounding: {err:.1e}")
    assert err < 1e-9


def test_w8a8_logit_error_is_that_of_fp8_rounding(w8a8, runs):
    """The reference FP8 GEMM rounds each token's activations to e4m3 per 128 features. That is the
    same kind of rounding (3 mantissa bits, one scale per 128 values) as the one that made the
    checkpoint's weights from the float32 model, so the logits should move by about as much: the bound
    is twice the weight rounding's own error on the same sequences (measured ratio 0.35), and LOGIT_NERR
    absolutely. (This bound is loose for loading mistakes: the block scales of random weights are all
    alike, so swapping the routed experts' scale blocks costs only 5e-3 here. The float32-exact test
    above is the one that catches those; measured on that mistake: 5.3e-3 against its 1e-9.)"""
    err, weights = _nerr(w8a8, runs.oracle), _nerr(runs.oracle, runs.source)
    print(f"\nfp8 methods' normalised logit error {err:.1e}; the weight rounding's {weights:.1e}")
    assert err < 2 * weights and err < LOGIT_NERR


def test_greedy_tokens_match_the_oracle_where_the_winner_is_clear(engine, runs, w8a8):
    """Where the oracle's top-2 logit margin exceeds half the standard deviation of that position's
    logits (the W8A8 rounding moves a margin by at most 0.19 std here, measured), dsserve picks the same
    token: teacher-forced on the oracle's own continuation (prefill), and decoding freely (the absorbed
    MLA decode path), where a first difference may only come at a step whose winner is not clear."""
    from dsserve import SamplingParams

    clear_needed = 0.5  # measured: the largest margin move is 0.19 std, the largest flipped margin 0.3 std
    n_prompt = [len(s) - NEW_TOKENS for s in runs.seqs]
    checked = 0
    for seq, n, want, got in zip(runs.seqs, n_prompt, runs.oracle, w8a8):
        for pos in range(n - 1, len(seq) - 1):
            top2 = want[pos].topk(2).values
            if float(top2[0] - top2[1]) > clear_needed * float(want[pos].std()):
                checked += 1
                assert int(got[pos].argmax()) == seq[pos + 1], f"prompt of {n} tokens, step {pos - n + 1}"
    print(f"\n{checked} of {len(runs.seqs) * NEW_TOKENS} generated steps have a clear winner")
    assert checked >= 8, f"only {checked} clear steps: the comparison says little"
    outs = engine.generate(input_ids=[s[:n] for s, n in zip(runs.seqs, n_prompt)],
                           sampling_params=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    same = 0
    for seq, n, want, out in zip(runs.seqs, n_prompt, runs.oracle, outs):
        for step, tok in enumerate(out.token_ids):
            if tok != seq[n + step]:
                row = want[n + step - 1]
                top2 = row.topk(2).values
                assert float(top2[0] - top2[1]) <= clear_needed * float(row.std()), (
                    f"prompt of {n} tokens, step {step}: dsserve {tok}, oracle {seq[n + step]} by a clear margin")
                break
            same += 1
    print(f"decoding freely, {same} of {len(outs) * NEW_TOKENS} tokens are the oracle's before a first difference")


# --------------------------------------------------------------------------------------------------
# loader errors


def _load_error(path: Path) -> str:
    from dsserve.models.loader import CheckpointError

    from dsserve import Engine

    with pytest.raises(CheckpointError) as info:
        Engine(model_path=str(path), device="cpu", dtype="float32", max_total_tokens=1024)
    msg = str(info.value)
    assert msg.strip() and "\n" not in msg.strip(), f"not one line: {msg!r}"
    return msg


@pytest.mark.parametrize("tensor", [
    "model.layers.0.self_attn.kv_b_proj.weight_scale_inv",
    "model.layers.0.mlp.up_proj.weight_scale_inv",          # a merged part
    "model.layers.2.mlp.experts.6.down_proj.weight_scale_inv",  # a routed expert
])
def test_missing_scale_is_named(ckpt, tmp_path, tensor):
    path = tmp_path / "broken"
    shutil.copytree(ckpt[0], path)
    tensors = read_tensors(path)
    del tensors[tensor]
    write_tensors(path, tensors)
    msg = _load_error(path)
    assert tensor in msg and "missing" in msg


def test_merged_part_off_the_block_grid_is_refused(ckpt, tmp_path):
    """A dense MLP of 192 rows per part: gate_proj's last scale block would also cover up_proj's
    first rows, so the merged gate_up_proj cannot take both weight_scale_inv tensors."""
    path = tmp_path / "odd"
    shutil.copytree(ckpt[0], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (path / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(path)
    assert "config.json" in msg and "gate_proj (192) + up_proj (192)" in msg
    assert "multiple of 128" in msg and "weight_scale_inv" in msg


def test_malformed_weight_block_size_is_refused(ckpt, tmp_path):
    path = tmp_path / "block"
    shutil.copytree(ckpt[0], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [128]
    (path / "config.json").write_text(json.dumps(cfg))
    assert "weight_block_size" in _load_error(path)


# --------------------------------------------------------------------------------------------------
# tensor-parallel shards and other devices' methods


def _assert_absorbed(attn, w: torch.Tensor) -> None:
    """attn's w_kc / w_vc are kv_b_proj's halves (w [H, nope + v, L]) in the layout its attention
    backend keeps them (packed per head on cpu)."""
    want_kc, want_vc = attn.backend.process_weights_after_loading(
        w[:, :64].contiguous(), w[:, 64:].transpose(1, 2).contiguous())

    def equal(got, want) -> bool:  # a backend may keep several layouts of one half (a dict of them)
        if isinstance(want, dict):
            return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        return torch.equal(got, want)

    assert equal(attn.w_kc, want_kc) and equal(attn.w_vc, want_vc)


def _stored_experts(m) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts' real weights ([E, 2I, D], [E, D, I]) in float32, dequantised from the
    checkpoint's format as stored, or from the cpu kernel's packed bytes."""
    from dsserve.plugins.cpu.packing import unpack_fp8

    def real(w, k):
        weight = unpack_fp8(w["packed"], k, m.backend.vbmi) if "packed" in w else w["weight"]
        return torch.stack([m.format.dequantize({"weight": weight[e], "weight_scale_inv": w["weight_scale_inv"][e]})
                            for e in range(m.spec.num_experts)])

    return real(m.w13, m.spec.hidden_size), real(m.w2, m.spec.intermediate_size)


def _ctx(rank: int, tp: int):
    from dsserve.core.plugins import default_registry
    from dsserve.core.reference import SingleProcessCommunicator
    from dsserve.models.layers import LayerContext
    from dsserve.plugins.cpu import CpuDevice

    return LayerContext(device=CpuDevice(), registry=default_registry(), dtype=torch.float32,
                        torch_device=torch.device("cpu"), quant=QuantConfig("fp8_block", (BLOCK, BLOCK)),
                        comm=SingleProcessCommunicator(rank=rank, world_size=tp))


def _fill(module, tensors: dict[str, torch.Tensor], tmp_path: Path, ctx) -> None:
    """What the loader does for these tensors: its own _copy_into on safetensors slices."""
    from dsserve.models.loader import _copy_into
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = tmp_path / f"part-{ctx.tp_rank}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
    targets = module.load_targets()
    assert set(targets) == set(tensors)
    with safe_open(file, framework="pt") as f:
        for name, target in targets.items():
            _copy_into(target, f.get_slice(name), name, file, ctx)
    module.post_load()


def test_tensor_parallel_shards_slice_scales_in_blocks(tmp_path):
    """A gated MLP (merged column-parallel gate_up, row-parallel down) and routed experts over 2 ranks:
    the ranks' partial outputs add up to the unsharded layer's (the per-128 activation groups of the
    row-parallel GEMM fall on shard boundaries, so the sum is exact up to float order)."""
    from dsserve.core.backends import MoESpec
    from dsserve.models.layers import GatedMLP, RoutedExperts

    gen = torch.Generator().manual_seed(3)
    hidden, inter, experts = 256, 512, 4
    tensors, deq = {}, {}
    for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
        w = torch.randn(*shape, generator=gen) * 0.05
        w[:BLOCK] *= 8  # blocks of very different scale: a misplaced scale row shows
        q, s = quantize_blockwise(w)
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"], deq[name] = q, s, dequantize(q, s)
    x = torch.randn(5, hidden, generator=gen)
    full = GatedMLP(hidden, inter, _ctx(0, 1))
    _fill(full, tensors, tmp_path, _ctx(0, 1))
    want = full(x)
    got = 0
    for rank in range(2):
        ctx = _ctx(rank, 2)
        part = GatedMLP(hidden, inter, ctx)
        _fill(part, tensors, tmp_path, ctx)
        half = slice(rank * inter // 2, (rank + 1) * inter // 2)
        dq = part.gate_up_proj.method.dequantized_weight(dict(part.gate_up_proj.params))
        assert torch.equal(dq, torch.cat([deq["gate_proj"][half], deq["up_proj"][half]]))
        assert torch.equal(part.down_proj.method.dequantized_weight(dict(part.down_proj.params)),
                           deq["down_proj"][:, half])
        got = got + part(x)
    # Two 256-term partial sums against one 512-term sum: the rounding error of every element scales
    # with the largest terms of the layer (outputs reach ~5e2 here), not with that element, so the
    # absolute bound is relative to the output's scale. A misplaced scale block errs by ~1e2.
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)

    spec = MoESpec(num_experts=experts, top_k=2, hidden_size=hidden, intermediate_size=inter,
                   scoring_func="sigmoid", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=True,
                   routed_scaling_factor=1.0, dtype=torch.float32, quant="fp8_block")
    moe = {"gate.weight": torch.randn(experts, hidden, generator=gen)}
    for e in range(experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            moe[f"experts.{e}.{name}.weight"] = tensors[f"{name}.weight"].clone()
            moe[f"experts.{e}.{name}.weight_scale_inv"] = tensors[f"{name}.weight_scale_inv"] * 2.0 ** e  # exact: a scale per expert
    for rank in range(2):
        ctx = _ctx(rank, 2)
        routed = RoutedExperts(spec, ctx, correction_bias=False)
        _fill(routed, moe, tmp_path, ctx)
        half = slice(rank * inter // 2, (rank + 1) * inter // 2)
        w13, w2 = _stored_experts(routed)
        for e in range(experts):
            assert torch.equal(w13[e], torch.cat([deq["gate_proj"][half], deq["up_proj"][half]]) * 2.0 ** e)
            assert torch.equal(w2[e], deq["down_proj"][:, half] * 2.0 ** e)


@pytest.mark.parametrize("what", ["output features", "input features", "gate_proj"])
def test_shard_boundary_inside_a_block_is_refused(what):
    """384 over 2 ranks is 192 per rank: the boundary would cut a 128-block of weight_scale_inv."""
    from dsserve.models.layers import GatedMLP, Linear

    build = {
        "output features": lambda ctx: Linear(256, 384, ctx, parallel="column"),
        "input features": lambda ctx: Linear(384, 256, ctx, parallel="row"),
        "gate_proj": lambda ctx: GatedMLP(256, 384, ctx),  # merged and column-parallel
    }[what]
    build(_ctx(0, 1))  # unsharded, every size is whole blocks
    with pytest.raises(ValueError, match=rf"^{what}: .*split a block of weight_scale_inv.*multiple of 128"):
        build(_ctx(0, 2))


def test_rocm_fnuz_conversion_runs_after_loading(ckpt):
    """The rocm plugin's method for MI300 GPUs converts the e4m3fn checkpoint to e4m3fnuz in
    process_weights_after_loading; served through the model (on cpu, by a test plugin), every fp8
    Linear ends up e4m3fnuz with doubled scales and MLA's absorbed weights are unchanged."""
    pytest.importorskip("triton")
    from dsserve.core.hookspecs import hookimpl
    from plugin_util import serving_cpu
    from dsserve.models.layers import Linear
    from dsserve.plugins.rocm.fp8_linear import Fp8BlockLinearFnuz

    from dsserve import Engine

    class FnuzOnCpu:
        @hookimpl(tryfirst=True)
        def dsserve_linear_method(self, device, spec):
            return Fp8BlockLinearFnuz(spec) if spec.quant == "fp8_block" else None

    with serving_cpu(FnuzOnCpu(), "fnuz-on-cpu"):
        eng = Engine(model_path=str(ckpt[0]), device="cpu", dtype="float32", max_total_tokens=1024,
                     model_worker="thread")  # the plugin above lives in this process
    try:
        model = eng.executor.runner.model
        fp8 = [m for n, m in model.named_modules()  # all but the LM head and the MoE routers
               if isinstance(m, Linear) and n != "lm_head" and not n.endswith(".routed.gate")]
        assert fp8 and all(type(m.method) is Fp8BlockLinearFnuz for m in fp8)
        assert all(m.params["weight"].dtype == torch.float8_e4m3fnuz for m in fp8)
        q_a = model.layers[0].self_attn.q_a_proj
        stored = read_tensors(ckpt[0])["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
        assert torch.equal(q_a.params["weight_scale_inv"], stored * 2)
        assert torch.equal(q_a.method.dequantized_weight(dict(q_a.params)),
                           ckpt[2]["model.layers.0.self_attn.q_a_proj.weight"])
        attn = model.layers[1].self_attn
        _assert_absorbed(attn, ckpt[2]["model.layers.1.self_attn.kv_b_proj.weight"].view(2, 128, 128))
    finally:
        eng.shutdown()
