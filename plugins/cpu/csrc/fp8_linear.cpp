// FP8 weight-only linear layers (fp8_block of dsserve.core.quant, DeepSeek-V3/R1's format): y = x W^T
// (+ b) with W kept e4m3 (fp8_gemm.h): bfloat16 activations on AVX512-BF16 CPUs, float32 elsewhere.
// Parallel over blocks of 16 output columns; each block's weights are read once for all rows.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "fp8_gemm.h"

namespace dsserve_cpu {
namespace {

template <typename T>
void write_rows(const std::vector<float>& y, int64_t M, int64_t N, int64_t nb, const float* bias, T* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < kFp8BlockN; ++j) {
      const int64_t n = nb * kFp8BlockN + j;
      out[m * N + n] = static_cast<T>(y[m * kFp8BlockN + j] + (bias ? bias[n] : 0.0f));
    }
}

template <typename T>
at::Tensor fp8_linear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& bias, int64_t group, bool float_out, bool vbmi,
                           bool amx) {
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * kFp8BlockN;
  const int64_t groups = (K + group - 1) / group;
  at::Tensor out = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const T* xp = x.data_ptr<T>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = w_scale.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(M * kFp8BlockN);
    TileScope tiles;
    for (int64_t nb = begin; nb < end; ++nb) {
      block_fp8_gemm(vbmi, amx, M, xp, K, wp + nb * K * kFp8BlockN, K / 2, group / 2, sp + nb * groups * kFp8BlockN, y.data());
      if (float_out)
        write_rows(y, M, N, nb, bp, out.data_ptr<float>());
      else
        write_rows(y, M, N, nb, bp, out.data_ptr<at::BFloat16>());
    }
  });
  return out;
}

}  // namespace

// x [M, K] contiguous (K even), bfloat16 (AVX512-BF16 CPUs only) or float32; packed uint8 [N/16, K*16];
// w_scale float32 [N/16, G, 16] (each column's weight scale per group of `group` k, G = ceil(K/group));
// bias [N] or None; `vbmi`: packed with pack_fp8(..., vbmi=True) for the table-lookup variant; `amx`:
// calls of enough bfloat16 rows run on AMX tiles. Returns [M, N] in bfloat16, or float32 when
// `float_out` (a float32 model keeps its float32 sums).
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                      const c10::optional<at::Tensor>& bias, int64_t group, bool float_out, bool vbmi, bool amx) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  const int64_t K = x.size(1), blocks = packed.size(0), groups = (K + group - 1) / group;
  TORCH_CHECK(K % 2 == 0 && group % 2 == 0, "K and the scale group must be even");
  TORCH_CHECK(!vbmi || (x.scalar_type() == at::kBFloat16 && K % 4 == 0 && group % 4 == 0),
              "the VBMI packing takes bfloat16 activations, K and the scale group multiples of 4");
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
              packed.size(1) == K * kFp8BlockN, "packed must be e4m3 bytes packed by dsserve.plugins.cpu.packing");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
              w_scale.numel() == blocks * groups * kFp8BlockN, "w_scale must be float32 [N/16, groups, 16]");
  check_amx(amx);
  switch (x.scalar_type()) {
    case at::kBFloat16: return fp8_linear_impl<at::BFloat16>(x, packed, w_scale, bias, group, float_out, vbmi, amx);
    case at::kFloat: return fp8_linear_impl<float>(x, packed, w_scale, bias, group, float_out, vbmi, amx);
    default: TORCH_CHECK(false, "fp8_linear takes bfloat16 or float32 activations, not ", x.scalar_type());
  }
}

}  // namespace dsserve_cpu
