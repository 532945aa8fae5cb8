// W8A8 int8 linear layers (int8_channel and int8_block of dsserve.core.quant): y = x W^T (+ b) with the
// activations quantized to int8 per token (per group of `group` features for block scales) inside the
// call, int32 products on the packed weight (int8_gemm.h), and both scales applied per output column and
// scale group in float32. Parallel over blocks of 16 output columns; each block's weights are read
// once for all rows.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "int8_gemm.h"

namespace dsserve_cpu {
namespace {

template <typename T>
at::Tensor int8_linear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp,
                            const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t group,
                            Int8Isa isa) {
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * kInt8BlockN;
  // a group of the whole row may end inside a group of 4 (K % 4): the padding bytes meet zero weights
  const int64_t K4 = (K + 3) / 4, groups = (K + group - 1) / group, group4 = (group + 3) / 4;
  at::Tensor xq = at::empty({M, K4 * 4}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M, groups}, x.options().dtype(at::kFloat));
  const T* xp = x.data_ptr<T>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float* sp = xs.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row<T>(isa, xp + m * K, K, group, qp + m * K4 * 4, sp + m * groups);
  });
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* cp = comp.data_ptr<int32_t>();
  const float* wsp = w_scale.data_ptr<float>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(M * kInt8BlockN);
    TileScope tiles;
    for (int64_t nb = begin; nb < end; ++nb) {
      block_int8_gemm(isa, M, qp, K4 * 4, sp, groups, wp + nb * K4 * 64, K4, group4,
                      cp + nb * groups * kInt8BlockN, wsp + nb * groups * kInt8BlockN, y.data());
      for (int64_t m = 0; m < M; ++m)
        for (int j = 0; j < kInt8BlockN; ++j) {
          const int64_t n = nb * kInt8BlockN + j;
          op[m * N + n] = static_cast<T>(y[m * kInt8BlockN + j] + (bp ? bp[n] : 0.0f));
        }
    }
  });
  return out;
}

}  // namespace

// x [M, K] contiguous bfloat16/float32; packed int8 [N/16, ceil(K/4) * 64]; per block, per scale group,
// per column: comp int32 [N/16, G, 16] (128 x the column's weight sum in the group) and w_scale float32
// [N/16, G, 16]; activations quantized per `group` features (K: per token; G = ceil(K/group)).
// Returns [M, N] in x's dtype.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t group, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  const int64_t K = x.size(1), K4 = (K + 3) / 4, groups = (K + group - 1) / group;
  TORCH_CHECK(group % 4 == 0 || group >= K, "the activation group must be a multiple of 4 or the whole row");
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kChar &&
              packed.size(1) == K4 * 64, "packed must be int8 packed by dsserve.plugins.cpu.packing for ", K,
              " input features");
  const int64_t cells = packed.size(0) * groups * kInt8BlockN;
  TORCH_CHECK(comp.scalar_type() == at::kInt && comp.is_contiguous() && comp.numel() == cells,
              "comp must be int32 [N/16, groups, 16]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == cells,
              "w_scale must be float32 [N/16, groups, 16]");
  check_int8_isa(isa);
  switch (x.scalar_type()) {
    case at::kBFloat16:
      return int8_linear_impl<at::BFloat16>(x, packed, comp, w_scale, bias, group, static_cast<Int8Isa>(isa));
    case at::kFloat:
      return int8_linear_impl<float>(x, packed, comp, w_scale, bias, group, static_cast<Int8Isa>(isa));
    default: TORCH_CHECK(false, "int8_linear serves bfloat16 and float32 activations, not ", x.scalar_type());
  }
}

}  // namespace dsserve_cpu
