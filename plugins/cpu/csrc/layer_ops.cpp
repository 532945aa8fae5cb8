// The small ops between a layer's big kernels: RMSNorm (with the residual add fused) and rotary
// embedding in place. Each replaces five to nine torch ops of a few hundred elements, which at
// decode cost more in dispatch than in arithmetic (F.rms_norm: ~20 us for one row of 1024 here).
// Arithmetic is float32 and each result is rounded once, as the torch reference does; rows may be
// strided (a slice of a wider projection), the last dim contiguous. Plain C++ vectorized by the
// compiler for AVX-512, AVX2 and baseline x86 (target_clones: the loader picks the clone).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "block_gemm.h"

namespace dsserve_cpu {
namespace {

#define DSSERVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

constexpr int64_t kRowsPerTask = 16;  // rows of one parallel task: one decode row runs inline

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, p + i, 2);
  return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16);
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(at::BFloat16* p, int64_t i, float v) {
  const uint16_t bits = bf16_bits(v);
  std::memcpy(p + i, &bits, 2);
}

// out = x * rsqrt(mean(x^2) + eps) * w; with res: res = x + res (rounded to T) first and the norm
// of that, as `x = x + f(x); norm(x)` computes it unfused.
// (The sum and the squares are two loops: one loop storing res and reading it back does not vectorize,
// 512 rows of 1024 took 727 against 140 us without the residual.)
template <typename T>
DSSERVE_CLONES void norm_row(const T* __restrict__ x, T* __restrict__ res, const T* w, T* out, int64_t D, float eps) {
  if (res) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) store(res, i, load(x, i) + load(res, i));
  }
  const T* src = res ? res : x;
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < D; ++i) ss += load(src, i) * load(src, i);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) store(out, i, load(src, i) * inv * load(w, i));
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& res, const at::Tensor& out) {
  const int64_t rows = x.size(0), D = x.size(1);
  const int64_t ldx = x.stride(0), ldr = res.defined() ? res.stride(0) : 0, ldo = out.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* rp = res.defined() ? res.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      norm_row<T>(xp + r * ldx, rp ? rp + r * ldr : nullptr, wp, op + r * ldo, D, static_cast<float>(eps));
  });
}

// One head's rotary dims in place: interleaved pairs (x[2i], x[2i+1]) (DeepSeek) or the halves
// (x[i], x[i + D/2]) (Llama/Qwen2), rotated by cos[i], sin[i].
template <typename T>
DSSERVE_CLONES void rotate_head(T* x, const float* cos, const float* sin, int64_t half, bool interleaved) {
  const int64_t step = interleaved ? 2 : 1, second = interleaved ? 1 : half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = load(x, i * step), b = load(x, i * step + second);
    store(x, i * step, a * cos[i] - b * sin[i]);
    store(x, i * step + second, b * cos[i] + a * sin[i]);
  }
}

template <typename T>
void rotary_impl(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                 bool interleaved) {
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  const int64_t st = x.stride(0), sh = x.stride(1), table = cos.size(0);
  T* xp = x.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < table, "position ", pos[t], " is outside the rotary table of ", table);
  at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h)
        rotate_head<T>(xp + t * st + h * sh, cp + pos[t] * half, sp + pos[t] * half, half, interleaved);
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, D] with contiguous rows");
}

}  // namespace

// x [rows, D]; weight [D]; residual [rows, D] or None (updated in place to x + residual, whose norm
// is returned); out [rows, D] or None (a new tensor). Rows of x, residual and out may be strided.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual,
                    const c10::optional<at::Tensor>& out) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(), "weight must be [D] in x's dtype");
  const at::Tensor res = residual.has_value() ? *residual : at::Tensor();
  const at::Tensor o = out.has_value() ? *out : at::empty_like(x, at::MemoryFormat::Contiguous);
  for (const at::Tensor* t : {&res, &o}) {
    if (!t->defined()) continue;
    check_rows(*t, "residual and out");
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(), "residual and out must match x");
  }
  switch (x.scalar_type()) {
    case at::kBFloat16: rms_norm_impl<at::BFloat16>(x, weight, eps, res, o); break;
    case at::kFloat: rms_norm_impl<float>(x, weight, eps, res, o); break;
    default: TORCH_CHECK(false, "rms_norm serves bfloat16 and float32, not ", x.scalar_type());
  }
  return o;
}

// x [tokens, heads, D] rotated in place (the last dim contiguous, the others any stride); positions
// [tokens] int64; cos, sin [max_positions, D / 2] float32.
void rotary(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
            bool interleaved) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "x must be [tokens, heads, even D], D contiguous");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == x.size(0) && positions.scalar_type() == at::kLong &&
                  positions.is_contiguous(), "positions must be [tokens] int64");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == x.size(2) / 2 && sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous float32 [max_positions, D / 2]");
  switch (x.scalar_type()) {
    case at::kBFloat16: rotary_impl<at::BFloat16>(x, positions, cos, sin, interleaved); break;
    case at::kFloat: rotary_impl<float>(x, positions, cos, sin, interleaved); break;
    default: TORCH_CHECK(false, "rotary serves bfloat16 and float32, not ", x.scalar_type());
  }
}

}  // namespace dsserve_cpu
