// y = x W^T (+ b) on a weight packed by dsserve.plugins.cpu.packing: parallel over pairs of blocks of
// 16 output columns, each block's weights read once for every row of x (a decode step reads each
// weight once; prefill rows reuse a block from L1).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "block_gemm.h"

namespace dsserve_cpu {
namespace {

// out[m][n] = sum_k x[m * ldx + k] * W[n][k] (+ bias[n]) for one packed W, written with row stride ldo.
template <typename T>
void linear_rows(Isa isa, int64_t M, const T* x, int64_t ldx, const T* w, int64_t K, int64_t blocks,
                 const float* bias, T* out, int64_t ldo, int64_t begin_pair, int64_t end_pair) {
  std::vector<float> acc(2 * M * kBlockN);
  float* acc1 = acc.data() + M * kBlockN;
  TileScope tiles;
  for (int64_t pair = begin_pair; pair < end_pair; ++pair) {
    const int64_t nb = 2 * pair, count = std::min<int64_t>(2, blocks - nb);
    if (count == 2)
      block_gemm2<T>(isa, M, x, ldx, w + nb * K * kBlockN, w + (nb + 1) * K * kBlockN, K, acc.data(), acc1,
                     kBlockN);
    else
      block_gemm<T>(isa, M, x, ldx, w + nb * K * kBlockN, K, acc.data(), kBlockN);
    for (int64_t c = 0; c < count; ++c)
      for (int64_t m = 0; m < M; ++m)
        for (int j = 0; j < kBlockN; ++j) {
          const int64_t col = (nb + c) * kBlockN + j;
          out[m * ldo + col] = static_cast<T>(acc[(c * M + m) * kBlockN + j] + (bias ? bias[col] : 0.0f));
        }
  }
}

template <typename T>
at::Tensor packed_linear_impl(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              Isa isa) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), N = blocks * kBlockN;
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    linear_rows<T>(isa, M, x.data_ptr<T>(), K, w.data_ptr<T>(), K, blocks, bp, out.data_ptr<T>(), N, begin, end);
  });
  return out;
}

// Per head h: out[:, h] = x[:, h] W_h^T, parallel over (head, pair of output blocks).
template <typename T>
at::Tensor head_linear_impl(const at::Tensor& x, const at::Tensor& w, Isa isa) {
  const int64_t M = x.size(0), H = x.size(1), K = x.size(2), blocks = w.size(1), N = blocks * kBlockN;
  const int64_t pairs = (blocks + 1) / 2;
  at::Tensor out = at::empty({M, H, N}, x.options());
  at::parallel_for(0, H * pairs, 1, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / pairs, pair = item % pairs;
      linear_rows<T>(isa, M, x.data_ptr<T>() + h * K, H * K, w.data_ptr<T>() + h * blocks * K * kBlockN, K, blocks,
                     nullptr, out.data_ptr<T>() + h * N, H * N, pair, pair + 1);
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
  check_isa(isa);
  switch (x.scalar_type()) {
    case at::kBFloat16: return packed_linear_impl<at::BFloat16>(x, w, bias, static_cast<Isa>(isa));
    case at::kFloat: return packed_linear_impl<float>(x, w, bias, static_cast<Isa>(isa));
    default: TORCH_CHECK(false, "packed_linear serves bfloat16 and float32, not ", x.scalar_type());
  }
}

// x [M, H, K] contiguous; w packed per head [H, N/16, K*16]. Returns [M, H, N] in x's dtype.
at::Tensor head_linear(const at::Tensor& x, const at::Tensor& w, int64_t isa) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be a contiguous [M, H, K] tensor");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.size(0) == x.size(1) && w.size(2) == x.size(2) * kBlockN,
              "w must be packed per head by dsserve.plugins.cpu.packing for ", x.size(1), " heads of ",
              x.size(2), " input features");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "x and w must share a dtype");
  check_isa(isa);
  switch (x.scalar_type()) {
    case at::kBFloat16: return head_linear_impl<at::BFloat16>(x, w, static_cast<Isa>(isa));
    case at::kFloat: return head_linear_impl<float>(x, w, static_cast<Isa>(isa));
    default: TORCH_CHECK(false, "head_linear serves bfloat16 and float32, not ", x.scalar_type());
  }
}

}  // namespace dsserve_cpu
