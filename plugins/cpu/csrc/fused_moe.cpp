// Routed experts of one MoE layer in one call: every (token, expert) pair of the batch, grouped by
// expert, through gate/up, SiLU-and-mul and down, weighted and summed per token.
//
// Parallel over output column blocks, never over tokens or experts: a thread owns a range of blocks
// of 16 columns for every expert, so it reads each expert's blocks of weights once per step (a decode
// step is bound by reading the weights) and is the only writer of those output columns (no atomics,
// no per-expert partial sums to reduce). It walks its range expert by expert: an expert's blocks lie
// one after another in memory, so each expert is one long read the prefetchers follow (block by
// block across experts: 315 -> 275 us at 1 token, 4.5 -> 3.4 ms at 64, bench-model shapes, Zen 4).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "block_gemm.h"
#include "fp8_gemm.h"
#include "int8_gemm.h"

namespace dsserve_cpu {
namespace {

struct Grouping {
  std::vector<int64_t> offsets;  // pairs of expert e: [offsets[e], offsets[e + 1])
  std::vector<int64_t> token;    // token of each pair, grouped by expert
  std::vector<float> weight;     // its routing weight
};

Grouping group_by_expert(const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t experts) {
  const int64_t pairs = topk_ids.numel(), k = topk_ids.size(1);
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  const float* weights = topk_weights.data_ptr<float>();
  Grouping g;
  g.offsets.assign(experts + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < experts, "topk_ids holds expert ", ids[p], " of ", experts);
    ++g.offsets[ids[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) g.offsets[e + 1] += g.offsets[e];
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  g.token.resize(pairs);
  g.weight.resize(pairs);
  for (int64_t p = 0; p < pairs; ++p) {  // stable: pairs of one expert keep their token order
    const int64_t slot = next[ids[p]]++;
    g.token[slot] = p / k;
    g.weight[slot] = weights[p];
  }
  return g;
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// act[m * ld + j] = silu(gate[m][j]) * up[m][j] for `rows` rows of 16, rounded once to A. On AVX-512
// the exponential is exp16's polynomial (relative error ~1e-7): a scalar expf per element had cost
// more than the GEMMs of a 512-token prefill's experts.
__attribute__((target("avx512f"))) inline void silu_mul_avx512(const float* gate, const float* up, int64_t rows,
                                                               float* act) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 g = _mm512_loadu_ps(gate + m * kBlockN);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(act + m * kBlockN, _mm512_mul_ps(s, _mm512_loadu_ps(up + m * kBlockN)));
  }
}

template <typename A>
void silu_and_mul(const float* gate, const float* up, int64_t rows, A* act, int64_t ld, float* scratch) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) {
    silu_mul_avx512(gate, up, rows, scratch);
  } else {
    for (int64_t i = 0; i < rows * kBlockN; ++i) scratch[i] = silu(gate[i]) * up[i];
  }
  for (int64_t m = 0; m < rows; ++m)
    for (int j = 0; j < kBlockN; ++j) act[m * ld + j] = static_cast<A>(scratch[m * kBlockN + j]);
}

// The most pairs any expert has: the size of the per-thread block buffers.
int64_t most_pairs(const Grouping& g) {
  int64_t most = 0;
  for (size_t e = 0; e + 1 < g.offsets.size(); ++e) most = std::max(most, g.offsets[e + 1] - g.offsets[e]);
  return most;
}

// Gate and up blocks b of every expert -> act[:, b*16 : b*16+16] = silu(gate) * up, in A.
// gate_up(e, b, first pair, rows, gate [rows, 16], up [rows, 16]) computes one expert's two blocks.
template <typename A, typename GateUp>
void gate_up_phase(const Grouping& g, int64_t inter_blocks, int64_t I, A* act, const GateUp& gate_up) {
  const int64_t E = static_cast<int64_t>(g.offsets.size()) - 1, most = most_pairs(g);
  at::parallel_for(0, inter_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gate(most * kBlockN), up(most * kBlockN), scratch(most * kBlockN);
    TileScope tiles;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t p = g.offsets[e], rows = g.offsets[e + 1] - p;
      if (rows == 0) continue;
      for (int64_t b = begin; b < end; ++b) {
        gate_up(e, b, p, rows, gate.data(), up.data());
        silu_and_mul(gate.data(), up.data(), rows, act + p * I + b * kBlockN, I, scratch.data());
      }
    }
  });
}

// Down blocks nb of every expert, weighted, summed into the tokens' output columns of out [T, D] float32.
// down(e, nb, first pair, rows, y [rows, 16]) computes one expert's block.
template <typename Down>
at::Tensor down_phase(const Grouping& g, int64_t tokens, int64_t D, const at::TensorOptions& options,
                      const Down& down) {
  const int64_t E = static_cast<int64_t>(g.offsets.size()) - 1, most = most_pairs(g), out_blocks = D / kBlockN;
  at::Tensor out = at::zeros({tokens, D}, options.dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, out_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(most * kBlockN);
    TileScope tiles;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t p = g.offsets[e], rows = g.offsets[e + 1] - p;
      if (rows == 0) continue;
      for (int64_t nb = begin; nb < end; ++nb) {
        down(e, nb, p, rows, y.data());
        for (int64_t m = 0; m < rows; ++m) {
          float* dst = o + g.token[p + m] * D + nb * kBlockN;
          const float wt = g.weight[p + m];
          for (int j = 0; j < kBlockN; ++j) dst[j] += wt * y[m * kBlockN + j];
        }
      }
    }
  });
  return out;
}

template <typename T>
at::Tensor fused_moe_impl(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& topk_weights, const at::Tensor& topk_ids, Isa isa) {
  const int64_t tokens = hidden.size(0), D = hidden.size(1), E = w13.size(0);
  const int64_t inter_blocks = w13.size(1) / 2, I = inter_blocks * kBlockN, out_blocks = w2.size(1);
  const Grouping g = group_by_expert(topk_ids, topk_weights, E);
  const int64_t pairs = static_cast<int64_t>(g.token.size());

  // The pairs' input rows, contiguous per expert.
  at::Tensor xs = hidden.index_select(0, torch::tensor(g.token, torch::kInt64));
  at::Tensor act = at::empty({pairs, I}, hidden.options());
  const T* x = xs.data_ptr<T>();
  T* a = act.data_ptr<T>();
  const T* w13p = w13.data_ptr<T>();
  const T* w2p = w2.data_ptr<T>();
  const int64_t w13_block = D * kBlockN, w2_block = I * kBlockN;  // elements per packed block

  gate_up_phase(g, inter_blocks, I, a, [&](int64_t e, int64_t b, int64_t p, int64_t rows, float* gate, float* up) {
    block_gemm2<T>(isa, rows, x + p * D, D, w13p + (e * 2 * inter_blocks + b) * w13_block,
                   w13p + (e * 2 * inter_blocks + inter_blocks + b) * w13_block, D, gate, up, kBlockN);
  });
  return down_phase(g, tokens, D, hidden.options(), [&](int64_t e, int64_t nb, int64_t p, int64_t rows, float* y) {
    block_gemm<T>(isa, rows, a + p * I, I, w2p + (e * out_blocks + nb) * w2_block, I, y, kBlockN);
  }).to(hidden.scalar_type());
}

// The int8 W8A8 experts (int8_channel, int8_block): the same structure with the activations quantized
// as the reference rounds them, each token's hidden row once (per token, or per token per block column)
// and each pair's float32 SiLU-and-mul row before the down GEMM.
struct Int8Experts {
  const int8_t* packed;  // [E, blocks, K4 * 64]
  const int32_t* comp;   // [E, blocks, groups, 16]
  const float* scale;    // [E, blocks, groups, 16]
  int64_t blocks, K, group;
  int64_t K4() const { return (K + 3) / 4; }
  int64_t groups() const { return (K + group - 1) / group; }
  // y [rows, 16] for output block b of expert e, on rows of quantized bytes q (stride K4*4) with scales s
  void gemm(Int8Isa isa, int64_t e, int64_t b, int64_t rows, const int8_t* q, const float* s, float* y) const {
    const int64_t cell = (e * blocks + b) * groups() * kInt8BlockN;
    block_int8_gemm(isa, rows, q, K4() * 4, s, groups(), packed + (e * blocks + b) * K4() * 64, K4(),
                    (group + 3) / 4, comp + cell, scale + cell, y);
  }
};

template <typename T>
void quantize_rows(Int8Isa isa, const T* x, int64_t rows, int64_t K, int64_t group, int8_t* q, float* s) {
  const int64_t K4 = (K + 3) / 4, groups = (K + group - 1) / group;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row<T>(isa, x + m * K, K, group, q + m * K4 * 4, s + m * groups);
  });
}

template <typename T>
at::Tensor fused_moe_int8_impl(const at::Tensor& hidden, const Int8Experts& w13, const Int8Experts& w2, int64_t E,
                               const at::Tensor& topk_weights, const at::Tensor& topk_ids, Int8Isa isa) {
  const int64_t tokens = hidden.size(0), D = hidden.size(1), inter_blocks = w13.blocks / 2, I = w2.K;
  const Grouping g = group_by_expert(topk_ids, topk_weights, E);
  const int64_t pairs = static_cast<int64_t>(g.token.size());

  // each token's hidden row quantized once, then gathered per pair (grouped by expert)
  at::Tensor hq = at::empty({tokens, w13.K4() * 4}, hidden.options().dtype(at::kChar));
  at::Tensor hs = at::empty({tokens, w13.groups()}, hidden.options().dtype(at::kFloat));
  quantize_rows<T>(isa, hidden.data_ptr<T>(), tokens, D, w13.group, hq.data_ptr<int8_t>(), hs.data_ptr<float>());
  const at::Tensor index = torch::tensor(g.token, torch::kInt64);
  const at::Tensor xq = hq.index_select(0, index), xs = hs.index_select(0, index);
  const int8_t* x = xq.data_ptr<int8_t>();
  const float* sx = xs.data_ptr<float>();

  at::Tensor act = at::empty({pairs, I}, hidden.options().dtype(at::kFloat));
  float* a = act.data_ptr<float>();
  gate_up_phase(g, inter_blocks, I, a, [&](int64_t e, int64_t b, int64_t p, int64_t rows, float* gate, float* up) {
    const int8_t* q = x + p * w13.K4() * 4;
    w13.gemm(isa, e, b, rows, q, sx + p * w13.groups(), gate);
    w13.gemm(isa, e, inter_blocks + b, rows, q, sx + p * w13.groups(), up);
  });

  at::Tensor aq = at::empty({pairs, w2.K4() * 4}, hidden.options().dtype(at::kChar));
  at::Tensor as = at::empty({pairs, w2.groups()}, hidden.options().dtype(at::kFloat));
  quantize_rows<float>(isa, a, pairs, I, w2.group, aq.data_ptr<int8_t>(), as.data_ptr<float>());
  const int8_t* q2 = aq.data_ptr<int8_t>();
  const float* s2 = as.data_ptr<float>();
  return down_phase(g, tokens, D, hidden.options(), [&](int64_t e, int64_t nb, int64_t p, int64_t rows, float* y) {
    w2.gemm(isa, e, nb, rows, q2 + p * w2.K4() * 4, s2 + p * w2.groups(), y);
  }).to(hidden.scalar_type());
}

// FP8 weight-only experts (fp8_block): activations T = bfloat16 on AVX512-BF16 CPUs (the SiLU-and-mul
// row rounded to bfloat16, as the unquantized kernel keeps it), float32 elsewhere; e4m3 weights widened
// in registers (fp8_gemm.h).
struct Fp8Experts {
  const uint8_t* packed;  // [E, blocks, K * 16]
  const float* scale;     // [E, blocks, groups, 16]
  int64_t blocks, K, group;
  bool vbmi;  // packed for the table-lookup variant
  bool amx;   // calls of enough rows on AMX tiles
  int64_t groups() const { return (K + group - 1) / group; }
  template <typename T>
  void gemm(int64_t e, int64_t b, int64_t rows, const T* x, float* y) const {
    block_fp8_gemm(vbmi, amx, rows, x, K, packed + (e * blocks + b) * K * kFp8BlockN, K / 2, group / 2,
                   scale + (e * blocks + b) * groups() * kFp8BlockN, y);
  }
};

template <typename T>
at::Tensor fused_moe_fp8_impl(const at::Tensor& hidden, const Fp8Experts& w13, const Fp8Experts& w2, int64_t E,
                              const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  const int64_t tokens = hidden.size(0), D = hidden.size(1), inter_blocks = w13.blocks / 2, I = w2.K;
  const Grouping g = group_by_expert(topk_ids, topk_weights, E);
  const int64_t pairs = static_cast<int64_t>(g.token.size());
  const at::Tensor xs = hidden.index_select(0, torch::tensor(g.token, torch::kInt64));
  const T* x = xs.data_ptr<T>();
  at::Tensor act = at::empty({pairs, I}, hidden.options());
  T* a = act.data_ptr<T>();
  gate_up_phase(g, inter_blocks, I, a, [&](int64_t e, int64_t b, int64_t p, int64_t rows, float* gate, float* up) {
    w13.gemm(e, b, rows, x + p * D, gate);
    w13.gemm(e, inter_blocks + b, rows, x + p * D, up);
  });
  return down_phase(g, tokens, D, hidden.options(), [&](int64_t e, int64_t nb, int64_t p, int64_t rows, float* y) {
    w2.gemm(e, nb, rows, a + p * I, y);
  });  // float32: the caller casts to its model's dtype
}

Fp8Experts fp8_experts(const at::Tensor& packed, const at::Tensor& scale, int64_t K, int64_t group, bool vbmi,
                       bool amx, const char* what) {
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
              packed.size(2) == K * kFp8BlockN, what, " must be e4m3 bytes packed by dsserve.plugins.cpu.packing for ",
              K, " input features");
  TORCH_CHECK(K % 2 == 0 && group % 2 == 0, what, ": K and the scale group must be even");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.numel() == packed.size(0) * packed.size(1) * ((K + group - 1) / group) * kFp8BlockN, what,
              "'s scale must be float32 [E, blocks, groups, 16]");
  TORCH_CHECK(!vbmi || (K % 4 == 0 && group % 4 == 0), what, ": the VBMI packing needs K and the group multiples of 4");
  return {packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), packed.size(1), K, group, vbmi, amx};
}

Int8Experts int8_experts(const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale, int64_t K,
                         int64_t group, const char* what) {
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kChar &&
              packed.size(2) == (K + 3) / 4 * 64, what, " must be int8 packed by dsserve.plugins.cpu.packing for ",
              K, " input features");
  const int64_t cells = packed.size(0) * packed.size(1) * ((K + group - 1) / group) * kInt8BlockN;
  TORCH_CHECK(comp.scalar_type() == at::kInt && comp.is_contiguous() && comp.numel() == cells, what,
              "'s comp must be int32 [E, blocks, groups, 16]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == cells, what,
              "'s scale must be float32 [E, blocks, groups, 16]");
  TORCH_CHECK(group % 4 == 0 || group >= K, what, ": the activation group must be a multiple of 4 or the whole row");
  return {packed.data_ptr<int8_t>(), comp.data_ptr<int32_t>(), scale.data_ptr<float>(), packed.size(1), K, group};
}

}  // namespace

// hidden [T, D] bfloat16/float32; w13 (gate blocks, then up blocks) and w2 int8-packed per expert
// ([E, 2I/16, ceil(D/4)*64], [E, D/16, ceil(I/4)*64]) with their comp and scale [E, blocks, groups, 16];
// activations quantized per group1 (w13's input) and group2 (w2's) features. Returns [T, D] in
// hidden's dtype.
at::Tensor fused_moe_int8(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w13_comp,
                          const at::Tensor& w13_scale, const at::Tensor& w2, const at::Tensor& w2_comp,
                          const at::Tensor& w2_scale, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                          int64_t group1, int64_t group2, int64_t isa) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [T, D] tensor");
  const int64_t D = hidden.size(1), E = w13.size(0), I = w13.size(1) / 2 * kInt8BlockN;
  TORCH_CHECK(w2.size(0) == E && w2.size(1) * kInt8BlockN == D, "w2 does not match hidden_size ", D);
  const Int8Experts p13 = int8_experts(w13, w13_comp, w13_scale, D, group1, "w13");
  const Int8Experts p2 = int8_experts(w2, w2_comp, w2_scale, I, group2, "w2");
  const at::Tensor ids = topk_ids.contiguous(), weights = topk_weights.to(at::kFloat).contiguous();
  check_int8_isa(isa);
  switch (hidden.scalar_type()) {
    case at::kBFloat16:
      return fused_moe_int8_impl<at::BFloat16>(hidden, p13, p2, E, weights, ids, static_cast<Int8Isa>(isa));
    case at::kFloat:
      return fused_moe_int8_impl<float>(hidden, p13, p2, E, weights, ids, static_cast<Int8Isa>(isa));
    default:
      TORCH_CHECK(false, "fused_moe_int8 serves bfloat16 and float32, not ", hidden.scalar_type());
  }
}

// hidden [T, D], bfloat16 (AVX512-BF16 CPUs only) or float32; w13 (gate blocks, then up blocks) and w2
// as e4m3 bytes packed per expert
// ([E, 2I/16, D*16], [E, D/16, I*16]) with per-column scales [E, blocks, groups, 16] per group of
// `group` k (`vbmi`: packed for the table-lookup variant; `amx`: experts with enough rows on AMX tiles).
// Returns [T, D] float32 (the sums; a float32 model keeps them).
at::Tensor fused_moe_fp8(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w13_scale,
                         const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                         const at::Tensor& topk_ids, int64_t group, bool vbmi, bool amx) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [T, D] tensor");
  const int64_t D = hidden.size(1), E = w13.size(0), I = w13.size(1) / 2 * kFp8BlockN;
  TORCH_CHECK(w2.size(0) == E && w2.size(1) * kFp8BlockN == D, "w2 does not match hidden_size ", D);
  TORCH_CHECK(!vbmi || hidden.scalar_type() == at::kBFloat16, "the VBMI variant takes bfloat16 hidden states");
  check_amx(amx);
  const auto p13 = fp8_experts(w13, w13_scale, D, group, vbmi, amx, "w13");
  const auto p2 = fp8_experts(w2, w2_scale, I, group, vbmi, amx, "w2");
  const at::Tensor ids = topk_ids.contiguous(), weights = topk_weights.to(at::kFloat).contiguous();
  switch (hidden.scalar_type()) {
    case at::kBFloat16: return fused_moe_fp8_impl<at::BFloat16>(hidden, p13, p2, E, weights, ids);
    case at::kFloat: return fused_moe_fp8_impl<float>(hidden, p13, p2, E, weights, ids);
    default: TORCH_CHECK(false, "fused_moe_fp8 takes bfloat16 or float32 hidden states, not ", hidden.scalar_type());
  }
}

// hidden [T, D]; w13 packed [E, 2I/16, D*16] (gate blocks, then up blocks); w2 packed [E, D/16, I*16];
// topk_weights [T, k] float32; topk_ids [T, k] int64. Returns [T, D] in hidden's dtype.
at::Tensor fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                     const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t isa) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [T, D] tensor");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.is_contiguous() && w2.is_contiguous(),
              "w13 and w2 must be packed by dsserve.plugins.cpu.packing");
  TORCH_CHECK(w13.scalar_type() == hidden.scalar_type() && w2.scalar_type() == hidden.scalar_type(),
              "weights and hidden must share a dtype");
  TORCH_CHECK(w13.size(2) == hidden.size(1) * kBlockN && w2.size(1) * kBlockN == hidden.size(1),
              "packed weights do not match hidden_size ", hidden.size(1));
  const at::Tensor ids = topk_ids.contiguous(), weights = topk_weights.to(at::kFloat).contiguous();
  check_isa(isa);
  switch (hidden.scalar_type()) {
    case at::kBFloat16:
      return fused_moe_impl<at::BFloat16>(hidden, w13, w2, weights, ids, static_cast<Isa>(isa));
    case at::kFloat:
      return fused_moe_impl<float>(hidden, w13, w2, weights, ids, static_cast<Isa>(isa));
    default:
      TORCH_CHECK(false, "fused_moe serves bfloat16 and float32, not ", hidden.scalar_type());
  }
}

}  // namespace dsserve_cpu

