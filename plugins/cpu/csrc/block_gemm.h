// One output block of 16 columns of y = x W^T, for up to 8 rows of x, on a packed weight.
//
// Packed layouts (made once at load by dsserve.plugins.cpu.packing): W [N, K] becomes N/16 blocks,
// each block the 16 rows n0..n0+15 of W laid out so that one vector load feeds 16 columns:
//   bfloat16: block[(k / 2) * 32 + j * 2 + k % 2] = W[n0 + j][k]   (K even: pairs along K, the
//             operand layout of AVX512-BF16's vdpbf16ps)
//   float32:  block[k * 16 + j] = W[n0 + j][k]
// A block of K x 16 weights is read once per call and reused for every row, so a decode step reads
// each weight once, and a prefill chunk of rows keeps it in L1/L2.
//
// The ISA is chosen by the caller (Python reads the CPU's flags and passes it), so one build serves
// every CPU, and tests can run each lower path on a CPU that has a higher one. On AMX CPUs bfloat16 runs
// on the tiles (amx.h: the bfloat16 layout is already the tiles' B operand) for every row count: with
// the weights prefetched they beat vdpbf16ps from one row on (4096 x 1024, weights out of cache,
// 2 threads of a Xeon: 1 row 268 against 297 us, 4 rows 289 against 409, 16 rows 308 against 1019).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <algorithm>
#include <cstring>

#include "amx.h"

namespace dsserve_cpu {

constexpr int64_t kBlockN = 16;
constexpr int kMaxRows = 8;

enum Isa : int64_t { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2, kAmxBf16 = 3 };

inline void check_isa(int64_t isa) { check_amx(isa == kAmxBf16); }

inline float bf16_to_float(at::BFloat16 v) { return static_cast<float>(v); }

// float -> bfloat16 bits, rounded to nearest even with NaN kept a quiet NaN (c10's rule), written
// branch-free so that loops over it vectorize
inline uint16_t bf16_bits(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  return static_cast<uint16_t>(v != v ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// ------------------------------------------------------------------------------------ vector math

// exp of 16 floats: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p Taylor to r^6 (relative error
// ~1e-7); inputs below -87 give ~1e-38 (a -inf max difference: the first block's `keep`).
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// ------------------------------------------------------------------------------ bfloat16 weights

template <int ROWS>
__attribute__((target("avx512f,avx512bf16"))) void block_bf16_dpbf16(
    const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K, float* out, int64_t ldo,
    bool accumulate) {
  __m512 acc[ROWS];
  const int32_t* xp[ROWS];
  for (int m = 0; m < ROWS; ++m) {
    acc[m] = accumulate ? _mm512_loadu_ps(out + m * ldo) : _mm512_setzero_ps();
    xp[m] = reinterpret_cast<const int32_t*>(x + m * ldx);  // a pair of bf16 along K per int32
  }
  for (int64_t kk = 0; kk < K / 2; ++kk) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kk * 32) + kPrefetchBytes, _MM_HINT_T0);
    const __m512i wv = _mm512_loadu_si512(w + kk * 32);
    for (int m = 0; m < ROWS; ++m) {
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(xp[m][kk]), (__m512bh)wv);
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

// Two blocks (w0, w1: 32 columns) against the same rows: each broadcast of x feeds two dot
// products, which is what bounds the one-block kernel once the rows outnumber a few.
template <int ROWS>
__attribute__((target("avx512f,avx512bf16"))) void block2_bf16_dpbf16(
    const at::BFloat16* x, int64_t ldx, const at::BFloat16* w0, const at::BFloat16* w1, int64_t K, float* out0,
    float* out1, int64_t ldo, bool accumulate) {
  __m512 acc0[ROWS], acc1[ROWS];
  const int32_t* xp[ROWS];
  for (int m = 0; m < ROWS; ++m) {
    acc0[m] = accumulate ? _mm512_loadu_ps(out0 + m * ldo) : _mm512_setzero_ps();
    acc1[m] = accumulate ? _mm512_loadu_ps(out1 + m * ldo) : _mm512_setzero_ps();
    xp[m] = reinterpret_cast<const int32_t*>(x + m * ldx);
  }
  for (int64_t kk = 0; kk < K / 2; ++kk) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + kk * 32) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + kk * 32) + kPrefetchBytes, _MM_HINT_T0);
    const __m512i wv0 = _mm512_loadu_si512(w0 + kk * 32), wv1 = _mm512_loadu_si512(w1 + kk * 32);
    for (int m = 0; m < ROWS; ++m) {
      const __m512i xv = _mm512_set1_epi32(xp[m][kk]);
      acc0[m] = _mm512_dpbf16_ps(acc0[m], (__m512bh)xv, (__m512bh)wv0);
      acc1[m] = _mm512_dpbf16_ps(acc1[m], (__m512bh)xv, (__m512bh)wv1);
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    _mm512_storeu_ps(out0 + m * ldo, acc0[m]);
    _mm512_storeu_ps(out1 + m * ldo, acc1[m]);
  }
}

// AVX-512 without the BF16 extension: widen each pair to float32 (a bf16 is the high half of a float).
template <int ROWS>
__attribute__((target("avx512f"))) void block_bf16_avx512(
    const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K, float* out, int64_t ldo,
    bool accumulate) {
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = accumulate ? _mm512_loadu_ps(out + m * ldo) : _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t kk = 0; kk < K / 2; ++kk) {
    const __m512i wv = _mm512_loadu_si512(w + kk * 32);
    const __m512 w_even = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
    const __m512 w_odd = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
    for (int m = 0; m < ROWS; ++m) {
      const at::BFloat16* xr = x + m * ldx + 2 * kk;
      acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_float(xr[0])), w_even, acc[m]);
      acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_float(xr[1])), w_odd, acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

// AVX2: the same on two 8-column halves.
template <int ROWS>
__attribute__((target("avx2,fma"))) void block_bf16_avx2(
    const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K, float* out, int64_t ldo,
    bool accumulate) {
  __m256 acc[ROWS][2];
  for (int m = 0; m < ROWS; ++m) {
    acc[m][0] = accumulate ? _mm256_loadu_ps(out + m * ldo) : _mm256_setzero_ps();
    acc[m][1] = accumulate ? _mm256_loadu_ps(out + m * ldo + 8) : _mm256_setzero_ps();
  }
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t kk = 0; kk < K / 2; ++kk) {
    for (int half = 0; half < 2; ++half) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kk * 32 + half * 16));
      const __m256 w_even = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 w_odd = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
      for (int m = 0; m < ROWS; ++m) {
        const at::BFloat16* xr = x + m * ldx + 2 * kk;
        acc[m][half] = _mm256_fmadd_ps(_mm256_set1_ps(bf16_to_float(xr[0])), w_even, acc[m][half]);
        acc[m][half] = _mm256_fmadd_ps(_mm256_set1_ps(bf16_to_float(xr[1])), w_odd, acc[m][half]);
      }
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    _mm256_storeu_ps(out + m * ldo, acc[m][0]);
    _mm256_storeu_ps(out + m * ldo + 8, acc[m][1]);
  }
}

// ------------------------------------------------------------------------------- float32 weights

template <int ROWS>
__attribute__((target("avx512f"))) void block_f32_avx512(
    const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo,
    bool accumulate) {
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = accumulate ? _mm512_loadu_ps(out + m * ldo) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 wv = _mm512_loadu_ps(w + k * 16);
    for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * ldx + k]), wv, acc[m]);
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

template <int ROWS>
__attribute__((target("avx2,fma"))) void block_f32_avx2(
    const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo,
    bool accumulate) {
  __m256 acc[ROWS][2];
  for (int m = 0; m < ROWS; ++m) {
    acc[m][0] = accumulate ? _mm256_loadu_ps(out + m * ldo) : _mm256_setzero_ps();
    acc[m][1] = accumulate ? _mm256_loadu_ps(out + m * ldo + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * 16);
    const __m256 w1 = _mm256_loadu_ps(w + k * 16 + 8);
    for (int m = 0; m < ROWS; ++m) {
      const __m256 xv = _mm256_set1_ps(x[m * ldx + k]);
      acc[m][0] = _mm256_fmadd_ps(xv, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xv, w1, acc[m][1]);
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    _mm256_storeu_ps(out + m * ldo, acc[m][0]);
    _mm256_storeu_ps(out + m * ldo + 8, acc[m][1]);
  }
}

// ------------------------------------------------------------------------------------- dispatch

template <typename T, int ROWS>
inline void block_rows(Isa isa, const T* x, int64_t ldx, const T* w, int64_t K, float* out, int64_t ldo,
                       bool accumulate) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (isa >= kAvx512Bf16) return block_bf16_dpbf16<ROWS>(x, ldx, w, K, out, ldo, accumulate);
    if (isa == kAvx512) return block_bf16_avx512<ROWS>(x, ldx, w, K, out, ldo, accumulate);
    return block_bf16_avx2<ROWS>(x, ldx, w, K, out, ldo, accumulate);
  } else {
    if (isa >= kAvx512) return block_f32_avx512<ROWS>(x, ldx, w, K, out, ldo, accumulate);
    return block_f32_avx2<ROWS>(x, ldx, w, K, out, ldo, accumulate);
  }
}

template <typename T, int ROWS>
inline void block_tile(Isa isa, int rows, const T* x, int64_t ldx, const T* w, int64_t K, float* out,
                       int64_t ldo, bool accumulate) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return block_tile<T, ROWS - 1>(isa, rows, x, ldx, w, K, out, ldo, accumulate);
  }
  block_rows<T, ROWS>(isa, x, ldx, w, K, out, ldo, accumulate);
}

// out[m * ldo + j] = sum_k x[m * ldx + k] * W[block][j][k] for any number of rows, j < 16.
// Rows go in tiles whose accumulators stay in registers: AVX2 4 (two registers a row of its 16),
// AVX-512 8 (16 measured slower: the accumulators spill). K goes in chunks of kChunkK so that the
// chunk of the block a tile has just read (8 KiB in bfloat16) is still in L1 for the next tile:
// the weights come from memory once whatever the number of rows.
constexpr int64_t kChunkK = 256;

// Adds the products of columns k0..K (fewer than an AMX tile's 32) to out: the AMX kernels' remainder.
inline void finish_k(int64_t rows, const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t k0, int64_t K,
                     float* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
    const int n = static_cast<int>(std::min<int64_t>(kMaxRows, rows - m0));
    block_tile<at::BFloat16, kMaxRows>(kAvx512Bf16, n, x + m0 * ldx + k0, ldx, w + k0 * kBlockN, K - k0,
                                       out + m0 * ldo, ldo, /*accumulate=*/true);
  }
}

template <typename T>
inline void block_gemm(Isa isa, int64_t rows, const T* x, int64_t ldx, const T* w, int64_t K, float* out,
                       int64_t ldo) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (isa == kAmxBf16 && K >= kTileK16) {
      const int64_t k_tiles = K - K % kTileK16;
      amx_bf16_gemm<1>(rows, x, ldx, w, nullptr, k_tiles, out, nullptr, ldo);
      if (k_tiles < K) finish_k(rows, x, ldx, w, k_tiles, K, out, ldo);
      return;
    }
  }
  const int64_t tile = isa == kAvx2 ? 4 : kMaxRows;
  for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
    const int64_t kc = std::min(kChunkK, K - k0);
    for (int64_t m0 = 0; m0 < rows; m0 += tile) {
      const int n = static_cast<int>(std::min(tile, rows - m0));
      block_tile<T, kMaxRows>(isa, n, x + m0 * ldx + k0, ldx, w + k0 * kBlockN, kc, out + m0 * ldo, ldo,
                              /*accumulate=*/k0 > 0);
    }
  }
}

template <int ROWS>
inline void block2_tile(int rows, const at::BFloat16* x, int64_t ldx, const at::BFloat16* w0,
                        const at::BFloat16* w1, int64_t K, float* out0, float* out1, int64_t ldo, bool accumulate) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return block2_tile<ROWS - 1>(rows, x, ldx, w0, w1, K, out0, out1, ldo, accumulate);
  }
  block2_bf16_dpbf16<ROWS>(x, ldx, w0, w1, K, out0, out1, ldo, accumulate);
}

// block_gemm for two blocks of weights against the same rows (gate and up of an expert, say); one
// pass over x where the CPU has AVX-512-BF16, two block_gemm calls elsewhere.
template <typename T>
inline void block_gemm2(Isa isa, int64_t rows, const T* x, int64_t ldx, const T* w0, const T* w1, int64_t K,
                        float* out0, float* out1, int64_t ldo) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (isa == kAmxBf16 && K >= kTileK16) {
      const int64_t k_tiles = K - K % kTileK16;
      amx_bf16_gemm<2>(rows, x, ldx, w0, w1, k_tiles, out0, out1, ldo);
      if (k_tiles < K) {
        finish_k(rows, x, ldx, w0, k_tiles, K, out0, ldo);
        finish_k(rows, x, ldx, w1, k_tiles, K, out1, ldo);
      }
      return;
    }
    if (isa >= kAvx512Bf16) {
      // one tile of rows needs no K chunks (they keep a block in L1 between tiles): one pass, the
      // accumulators in registers throughout
      const int64_t chunk = rows <= kMaxRows ? K : kChunkK;
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t kc = std::min(chunk, K - k0);
        for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
          const int n = static_cast<int>(std::min<int64_t>(kMaxRows, rows - m0));
          block2_tile<kMaxRows>(n, x + m0 * ldx + k0, ldx, w0 + k0 * kBlockN, w1 + k0 * kBlockN, kc,
                                out0 + m0 * ldo, out1 + m0 * ldo, ldo, k0 > 0);
        }
      }
      return;
    }
  }
  block_gemm<T>(isa, rows, x, ldx, w0, K, out0, ldo);
  block_gemm<T>(isa, rows, x, ldx, w1, K, out1, ldo);
}

}  // namespace dsserve_cpu
