// One output block of 16 columns of int32 sums x_q W_q^T for W8A8: int8 weights, int8 activations.
//
// Packed layout (made once at load by dsserve.plugins.cpu.packing.pack_int8): W [N, K] int8 becomes
// N/16 blocks of K4 = ceil(K/4) groups of 16 columns x 4 consecutive k (K zero-padded to K4 * 4):
//   block[(k / 4) * 64 + j * 4 + k % 4] = W[n0 + j][k]
// one 64-byte load feeds 16 columns with 4 products each: the operand layout of AVX512-VNNI's vpdpbusd.
//
// vpdpbusd multiplies unsigned by signed bytes, so the activations enter as x_q + 128 (0..255) and the
// caller subtracts 128 * sum_k W[n][k] (the "compensation", computed at pack time). Without VNNI the
// AVX2 variant widens both operands to int16 and uses vpmaddwd on the signed activations (exact, no
// saturation; vpmaddubsw would saturate 255 x 127 x 2). Both give exactly sum_k x_q[k] * W[n][k]. On
// AMX-INT8 CPUs the same layout is the tiles' B operand and the same biased activations their A
// (tdpbusd, amx.h), for calls of enough rows whose K and scale groups are whole tiles of 64 k.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "amx.h"

namespace dsserve_cpu {

constexpr int64_t kInt8BlockN = 16;

enum Int8Isa : int64_t { kInt8Avx2 = 0, kInt8Avx512Vnni = 1, kInt8Amx = 2 };

// Rows from which an int8 block GEMM runs on AMX tiles rather than vpdpbusd: one tdpbusd costs the same
// for 1 row as for 16, and at 1-2 rows vpdpbusd keeps up with memory (1024 x 512 weights, 2 threads of
// a Xeon: 1 row 20.7 against 23.7 us on tiles, 3 rows 25.7 against 24.2, 16 rows 64.8 against 38.4).
constexpr int64_t kInt8AmxMinRows = 3;

inline void check_int8_isa(int64_t isa) { check_amx(isa == kInt8Amx); }

// One tile of ROWS rows against one packed block, over every scale group of K: after each group the
// int32 sums become float and are scaled into y (y[m * 16 + j] += (sum - comp) * sx[m][g] * ws[g][j]),
// all in registers. x: the rows' quantized bytes (row stride ldx), sx: their group scales (row stride
// lds); comp [groups][16] (VNNI's +128 compensation; ignored by AVX2) and ws [groups][16]: this block's.
template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_int8_vnni(
    const uint8_t* x, int64_t ldx, const float* sx, int64_t lds, const int8_t* w, int64_t K4, int64_t group4,
    const int32_t* comp, const float* ws, float* y) {
  __m512 out[ROWS];
  const int32_t* xp[ROWS];
  for (int m = 0; m < ROWS; ++m) {
    out[m] = _mm512_setzero_ps();
    xp[m] = reinterpret_cast<const int32_t*>(x + m * ldx);  // 4 activation bytes per int32
  }
  // few rows: U accumulators a row over alternating k, so that U vpdpbusd are in flight rather than one
  // chain of dependent ones (one row: 16 -> 9 us for a 384 x 1024 weight on a Zen 4)
  constexpr int U = ROWS == 1 ? 4 : ROWS == 2 ? 2 : 1;
  for (int64_t g = 0, k0 = 0; k0 < K4; ++g, k0 += group4) {
    const int64_t k1 = std::min(K4, k0 + group4);
    __m512i a[ROWS][U];
    for (int m = 0; m < ROWS; ++m)
      for (int u = 0; u < U; ++u) a[m][u] = _mm512_setzero_si512();
    int64_t kk = k0;
    for (; kk + U <= k1; kk += U)
      for (int u = 0; u < U; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (kk + u) * 64) + kPrefetchBytes, _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512(w + (kk + u) * 64);
        for (int m = 0; m < ROWS; ++m) a[m][u] = _mm512_dpbusd_epi32(a[m][u], _mm512_set1_epi32(xp[m][kk + u]), wv);
      }
    for (; kk < k1; ++kk) {
      const __m512i wv = _mm512_loadu_si512(w + kk * 64);
      for (int m = 0; m < ROWS; ++m) a[m][0] = _mm512_dpbusd_epi32(a[m][0], _mm512_set1_epi32(xp[m][kk]), wv);
    }
    const __m512i c = _mm512_loadu_si512(comp + g * kInt8BlockN);
    const __m512 s = _mm512_loadu_ps(ws + g * kInt8BlockN);
    for (int m = 0; m < ROWS; ++m) {
      for (int u = 1; u < U; ++u) a[m][0] = _mm512_add_epi32(a[m][0], a[m][u]);
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(a[m][0], c));
      out[m] = _mm512_fmadd_ps(sum, _mm512_mul_ps(s, _mm512_set1_ps(sx[m * lds + g])), out[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(y + m * kInt8BlockN, out[m]);
}

// AVX2: each 16-byte quarter of a group of 4 k (4 columns x 4 k) widened to int16 and multiplied by the
// row's 4 activations repeated; vpmaddwd leaves two partial sums per column (k 0-1 and k 2-3), added
// when the scale group ends.
template <int ROWS>
__attribute__((target("avx2,fma"))) void tile_int8_avx2(
    const int8_t* x, int64_t ldx, const float* sx, int64_t lds, const int8_t* w, int64_t K4, int64_t group4,
    const int32_t* /*comp*/, const float* ws, float* y) {
  for (int m = 0; m < ROWS; ++m)
    for (int j = 0; j < kInt8BlockN; ++j) y[m * kInt8BlockN + j] = 0.0f;
  for (int64_t g = 0, k0 = 0; k0 < K4; ++g, k0 += group4) {
    const int64_t k1 = std::min(K4, k0 + group4);
    __m256i a[ROWS][4];
    for (int m = 0; m < ROWS; ++m)
      for (int q = 0; q < 4; ++q) a[m][q] = _mm256_setzero_si256();
    for (int64_t kk = k0; kk < k1; ++kk) {
      __m256i wq[4];
      for (int q = 0; q < 4; ++q)
        wq[q] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kk * 64 + q * 16)));
      for (int m = 0; m < ROWS; ++m) {
        int32_t four;
        std::memcpy(&four, x + m * ldx + kk * 4, 4);
        const __m256i xv = _mm256_cvtepi8_epi16(_mm_set1_epi32(four));  // [x0 x1 x2 x3] x 4 as int16
        for (int q = 0; q < 4; ++q) a[m][q] = _mm256_add_epi32(a[m][q], _mm256_madd_epi16(wq[q], xv));
      }
    }
    for (int m = 0; m < ROWS; ++m) {
      const float row_scale = sx[m * lds + g];
      for (int q = 0; q < 4; ++q) {
        alignas(32) int32_t lanes[8];  // [c0 k01, c0 k23, c1 k01, c1 k23, ...] of the quarter's 4 columns
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a[m][q]);
        for (int c = 0; c < 4; ++c) {
          const int j = q * 4 + c;
          y[m * kInt8BlockN + j] += static_cast<float>(lanes[2 * c] + lanes[2 * c + 1]) *
                                    (ws[g * kInt8BlockN + j] * row_scale);
        }
      }
    }
  }
}

template <int ROWS>
inline void tile_int8(Int8Isa isa, int rows, const int8_t* x, int64_t ldx, const float* sx, int64_t lds,
                      const int8_t* w, int64_t K4, int64_t group4, const int32_t* comp, const float* ws, float* y) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return tile_int8<ROWS - 1>(isa, rows, x, ldx, sx, lds, w, K4, group4, comp, ws, y);
  }
  if (isa >= kInt8Avx512Vnni)
    tile_int8_vnni<ROWS>(reinterpret_cast<const uint8_t*>(x), ldx, sx, lds, w, K4, group4, comp, ws, y);
  else
    tile_int8_avx2<ROWS>(x, ldx, sx, lds, w, K4, group4, comp, ws, y);
}

// y [rows, 16] = the scaled products of every row with one packed block, in row tiles whose
// accumulators stay in registers (VNNI 8 rows, AVX2 2: four registers a row); on AMX tiles of 16.
inline void block_int8_gemm(Int8Isa isa, int64_t rows, const int8_t* x, int64_t ldx, const float* sx, int64_t lds,
                            const int8_t* w, int64_t K4, int64_t group4, const int32_t* comp, const float* ws,
                            float* y) {
  constexpr int64_t kQuads = kTileK8 / 4;
  if (isa == kInt8Amx && rows >= kInt8AmxMinRows && K4 % kQuads == 0 && (group4 % kQuads == 0 || group4 >= K4))
    return amx_int8_gemm(rows, reinterpret_cast<const uint8_t*>(x), ldx, sx, lds, w, K4, std::min(group4, K4), comp,
                         ws, y);
  const int64_t tile = isa >= kInt8Avx512Vnni ? 8 : 2;
  for (int64_t m0 = 0; m0 < rows; m0 += tile) {
    const int n = static_cast<int>(std::min(tile, rows - m0));
    tile_int8<8>(isa, n, x + m0 * ldx, ldx, sx + m0 * lds, lds, w, K4, group4, comp, ws, y + m0 * kInt8BlockN);
  }
}

// Row m's activations quantized per group of `group` features (group == K: per token), as
// dsserve.core.quant.quantize_per_token_group rounds them: scale = max(amax, 1e-10) / 127, q =
// round-half-even(x / scale). Writes ceil(K/4) * 4 bytes (zero-padded), biased by +128 for VNNI (read
// as u8), and one scale per group.
template <typename T>
inline float load_float(const T* p) { return static_cast<float>(*p); }

template <typename T>
__attribute__((target("avx512f,avx512bw"))) void quantize_row_avx512(const T* x, int64_t K, int64_t group,
                                                                      bool biased, int8_t* q, float* scales) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  const __m512i shift = _mm512_set1_epi32(biased ? 128 : 0);
  alignas(64) float buf[16];
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
    const int64_t g1 = std::min(K, g0 + group);
    __m512 amax = _mm512_setzero_ps();
    int64_t k = g0;
    for (; k + 16 <= g1; k += 16) {
      for (int i = 0; i < 16; ++i) buf[i] = load_float(x + k + i);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_load_ps(buf)));
    }
    float m = _mm512_reduce_max_ps(amax);
    for (; k < g1; ++k) m = std::max(m, std::abs(load_float(x + k)));
    const float scale = std::max(m, 1e-10f) / 127.0f;
    scales[gi] = scale;
    const __m512 sv = _mm512_set1_ps(scale);
    for (k = g0; k + 16 <= g1; k += 16) {
      for (int i = 0; i < 16; ++i) buf[i] = load_float(x + k + i);
      __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_load_ps(buf), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
      const __m512i iv = _mm512_add_epi32(_mm512_cvtps_epi32(v), shift);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(iv));
    }
    for (; k < g1; ++k) {
      const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(load_float(x + k) / scale)));
      q[k] = static_cast<int8_t>(static_cast<uint8_t>(static_cast<int32_t>(v) + (biased ? 128 : 0)));
    }
  }
}

template <typename T>
inline void quantize_row(Int8Isa isa, const T* x, int64_t K, int64_t group, int8_t* q, float* scales) {
  const bool biased = isa >= kInt8Avx512Vnni;
  if (biased) {
    quantize_row_avx512<T>(x, K, group, true, q, scales);
  } else {
    for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
      const int64_t g1 = std::min(K, g0 + group);
      float amax = 0.0f;
      for (int64_t k = g0; k < g1; ++k) amax = std::max(amax, std::abs(load_float(x + k)));
      const float scale = std::max(amax, 1e-10f) / 127.0f;
      scales[gi] = scale;
      for (int64_t k = g0; k < g1; ++k)
        q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(load_float(x + k) / scale))));
    }
  }
  const int64_t K4 = (K + 3) / 4;
  for (int64_t k = K; k < K4 * 4; ++k) q[k] = 0;  // padding meets zero weights
}

}  // namespace dsserve_cpu
