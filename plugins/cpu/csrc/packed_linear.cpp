// y = x W^T (+ b) on a weight packed by dsserve.plugins.cpu.packing: parallel over pairs of blocks of
// 16 output columns, each block's weights read once for every row of x (a decode step reads each
// weight once; prefill rows reuse a block from L1).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "block_gemm.h"

namespace dsserve_cpu {
namespace {

template <typename T>
at::Tensor packed_linear_impl(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              Isa isa) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), N = blocks * kBlockN;
  at::Tensor out = at::empty({M, N}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(2 * M * kBlockN);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t nb = 2 * pair, count = std::min<int64_t>(2, blocks - nb);
      float* acc1 = acc.data() + M * kBlockN;
      if (count == 2)
        block_gemm2<T>(isa, M, xp, K, wp + nb * K * kBlockN, wp + (nb + 1) * K * kBlockN, K, acc.data(), acc1,
                       kBlockN);
      else
        block_gemm<T>(isa, M, xp, K, wp + nb * K * kBlockN, K, acc.data(), kBlockN);
      for (int64_t c = 0; c < count; ++c)
        for (int64_t m = 0; m < M; ++m)
          for (int j = 0; j < kBlockN; ++j) {
            const int64_t col = (nb + c) * kBlockN + j;
            op[m * N + col] = static_cast<T>(acc[(c * M + m) * kBlockN + j] + (bp ? bp[col] : 0.0f));
          }
    }
  });
  return out;
}

}  // namespace

// x [M, K] contiguous; w packed [N/16, K*16]; bias [N] or None. Returns [M, N] in x's dtype.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) * kBlockN,
              "w must be packed by dsserve.plugins.cpu.packing for ", x.size(1), " input features");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "x and w must share a dtype");
  switch (x.scalar_type()) {
    case at::kBFloat16: return packed_linear_impl<at::BFloat16>(x, w, bias, static_cast<Isa>(isa));
    case at::kFloat: return packed_linear_impl<float>(x, w, bias, static_cast<Isa>(isa));
    default: TORCH_CHECK(false, "packed_linear serves bfloat16 and float32, not ", x.scalar_type());
  }
}

}  // namespace dsserve_cpu
