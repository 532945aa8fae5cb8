// FP8 (e4m3) weight-only GEMM for DeepSeek's FP8 checkpoints: the weights stay 1 byte each and are
// widened in registers (exact: every e4m3 value is a bfloat16 value), to bfloat16 for AVX512-BF16's
// vdpbf16ps on bfloat16 activations, or to float32 for FMAs on float32 activations (AVX2, and AVX-512
// CPUs without BF16); each block column of `group` k is summed on its own and scaled by its weight scale
// in float32. No CPU has FP8 arithmetic; this reads half the bytes of a bfloat16 weight.
//
// Packed layout (dsserve.plugins.cpu.packing.pack_fp8): W [N, K] e4m3 becomes N/16 blocks laid out as
// the bfloat16 blocks of block_gemm.h, one byte per weight: block[(k / 2) * 32 + j * 2 + k % 2] =
// W[n0 + j][k] (K even). One 32-byte load widens to one vdpbf16ps operand (16 columns x 2 k).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "amx.h"

namespace dsserve_cpu {

constexpr int64_t kFp8BlockN = 16;

// 32 e4m3fn bytes -> 32 bfloat16. Normal numbers (exponent field e > 0) move their exponent from bias
// 7 to bias 127 (+120) and their 3 mantissa bits to the top of bfloat16's 7; subnormals (m x 2^-9) come
// from an 8-entry table. 0x7f/0xff (e4m3fn's NaN, never in a checkpoint) would read as +-480.
__attribute__((target("avx512f,avx512bw"))) inline __m512i e4m3_to_bf16(__m256i bytes) {
  const __m512i b = _mm512_cvtepu8_epi16(bytes);
  const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x7f)), 4),
                                          _mm512_set1_epi16(120 << 7));
  // bfloat16 bits of m x 2^-9 for m = 0..7 (the rest of the table is never indexed)
  const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         0x3C60, 0x3C40, 0x3C20, 0x3C00, 0x3BC0, 0x3B80, 0x3B00, 0);
  const __m512i sub = _mm512_permutexvar_epi16(_mm512_and_si512(b, _mm512_set1_epi16(7)), table);
  const __mmask32 is_normal = _mm512_test_epi16_mask(b, _mm512_set1_epi16(0x78));
  const __m512i v = _mm512_mask_blend_epi16(is_normal, sub, normal);
  return _mm512_or_si512(v, _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8));
}

// y [ROWS, 16] = sum over the scale groups g of ws[g] * (x_rows[:, group g] . W_block[:, group g]^T).
// x: bfloat16 rows (stride ldx, K even); w: the packed block; K2 = K / 2, group2 = group / 2;
// ws [groups][16]: the block's per-column weight scales.
template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile_fp8_dpbf16(
    const at::BFloat16* x, int64_t ldx, const uint8_t* w, int64_t K2, int64_t group2, const float* ws, float* y) {
  __m512 out[ROWS];
  const int32_t* xp[ROWS];
  for (int m = 0; m < ROWS; ++m) {
    out[m] = _mm512_setzero_ps();
    xp[m] = reinterpret_cast<const int32_t*>(x + m * ldx);  // a pair of bf16 along K per int32
  }
  for (int64_t g = 0, k0 = 0; k0 < K2; ++g, k0 += group2) {
    const int64_t k1 = std::min(K2, k0 + group2);
    __m512 a[ROWS];
    for (int m = 0; m < ROWS; ++m) a[m] = _mm512_setzero_ps();
    for (int64_t kk = k0; kk < k1; ++kk) {
      if (kk % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + kk * 32) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i wv = e4m3_to_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kk * 32)));
      for (int m = 0; m < ROWS; ++m) a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)_mm512_set1_epi32(xp[m][kk]), (__m512bh)wv);
    }
    const __m512 s = _mm512_loadu_ps(ws + g * kFp8BlockN);
    for (int m = 0; m < ROWS; ++m) out[m] = _mm512_fmadd_ps(a[m], s, out[m]);
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(y + m * kFp8BlockN, out[m]);
}

// With AVX512-VBMI the widening is a table lookup: vpermi2b maps 64 bytes at once through two
// 128-entry byte tables (the low and high bytes of each magnitude's bfloat16; the sign bit, bit 7, is
// ignored by the lookup and OR-ed into the high byte), and vpunpck{l,h}bw interleave them into two
// vdpbf16ps operands: about a third of e4m3_to_bf16's instructions per weight. vpunpck works within
// 128-bit lanes, so this variant's packing (pack_fp8(..., vbmi=True)) stores each 64 bytes (two
// operands, k pairs kk and kk + 1) as chunk[L * 16 + j] = natural[L * 8 + j], chunk[L * 16 + 8 + j] =
// natural[32 + L * 8 + j] for lane L < 4, j < 8. It needs K % 4 == 0.
struct E4m3ByteTables {
  alignas(64) uint8_t lo[128];  // low byte of the bfloat16 of magnitude code i (7 bits)
  alignas(64) uint8_t hi[128];  // its high byte, sign clear
};

inline const E4m3ByteTables& e4m3_byte_tables() {
  static const E4m3ByteTables tables = [] {
    static constexpr uint16_t kSub[8] = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};  // m x 2^-9
    E4m3ByteTables t{};
    for (int i = 0; i < 128; ++i) {
      const uint16_t v = (i >> 3) ? static_cast<uint16_t>((i << 4) + (120 << 7)) : kSub[i & 7];
      t.lo[i] = static_cast<uint8_t>(v & 0xFF);
      t.hi[i] = static_cast<uint8_t>(v >> 8);
    }
    return t;
  }();
  return tables;
}

// The tables in registers, and one 64-byte chunk of a VBMI-packed block widened to its two vdpbf16ps
// operands (k pairs kk and kk + 1).
struct VbmiWidener {
  __m512i lo0, lo1, hi0, hi1, sign;
};

__attribute__((target("avx512f,avx512bw"))) inline VbmiWidener vbmi_widener() {
  const E4m3ByteTables& t = e4m3_byte_tables();
  return {_mm512_load_si512(t.lo), _mm512_load_si512(t.lo + 64), _mm512_load_si512(t.hi),
          _mm512_load_si512(t.hi + 64), _mm512_set1_epi8(static_cast<char>(0x80))};
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline void vbmi_widen(const VbmiWidener& v, __m512i b,
                                                                              __m512i& w0, __m512i& w1) {
  const __m512i lo = _mm512_permutex2var_epi8(v.lo0, b, v.lo1);
  const __m512i hi = _mm512_or_si512(_mm512_permutex2var_epi8(v.hi0, b, v.hi1), _mm512_and_si512(b, v.sign));
  w0 = _mm512_unpacklo_epi8(lo, hi);
  w1 = _mm512_unpackhi_epi8(lo, hi);
}

template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512bf16,avx512vbmi"))) void tile_fp8_vbmi(
    const at::BFloat16* x, int64_t ldx, const uint8_t* w, int64_t K2, int64_t group2, const float* ws, float* y) {
  const VbmiWidener widener = vbmi_widener();
  __m512 out[ROWS];
  const int32_t* xp[ROWS];
  for (int m = 0; m < ROWS; ++m) {
    out[m] = _mm512_setzero_ps();
    xp[m] = reinterpret_cast<const int32_t*>(x + m * ldx);
  }
  for (int64_t g = 0, k0 = 0; k0 < K2; ++g, k0 += group2) {
    const int64_t k1 = std::min(K2, k0 + group2);
    __m512 a[ROWS];
    for (int m = 0; m < ROWS; ++m) a[m] = _mm512_setzero_ps();
    for (int64_t kk = k0; kk < k1; kk += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kk * 32) + kPrefetchBytes, _MM_HINT_T0);
      __m512i w0, w1;
      vbmi_widen(widener, _mm512_loadu_si512(w + kk * 32), w0, w1);
      for (int m = 0; m < ROWS; ++m) {
        a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)_mm512_set1_epi32(xp[m][kk]), (__m512bh)w0);
        a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)_mm512_set1_epi32(xp[m][kk + 1]), (__m512bh)w1);
      }
    }
    const __m512 s = _mm512_loadu_ps(ws + g * kFp8BlockN);
    for (int m = 0; m < ROWS; ++m) out[m] = _mm512_fmadd_ps(a[m], s, out[m]);
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(y + m * kFp8BlockN, out[m]);
}

template <int ROWS>
inline void tile_fp8(bool vbmi, int rows, const at::BFloat16* x, int64_t ldx, const uint8_t* w, int64_t K2,
                     int64_t group2, const float* ws, float* y) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return tile_fp8<ROWS - 1>(vbmi, rows, x, ldx, w, K2, group2, ws, y);
  }
  if (vbmi)
    tile_fp8_vbmi<ROWS>(x, ldx, w, K2, group2, ws, y);
  else
    tile_fp8_dpbf16<ROWS>(x, ldx, w, K2, group2, ws, y);
}

// ------------------------------------------------------------------------------------------- AMX
// On AMX CPUs a call of enough rows widens the block once to bfloat16 (block_gemm.h's layout, which is
// the tiles' B operand) and runs each scale group on the tiles, its float32 sums scaled into y as the
// vector kernels scale theirs; the widening is then paid once per block instead of once per 8 rows.

// The K x 16 e4m3 weights of one packed block -> bfloat16 in block_gemm.h's pair layout.
__attribute__((target("avx512f,avx512bw"))) inline void widen_block(const uint8_t* w, int64_t K2, at::BFloat16* out) {
  for (int64_t kk = 0; kk < K2; ++kk)
    _mm512_storeu_si512(out + kk * 32, e4m3_to_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kk * 32))));
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline void widen_block_vbmi(const uint8_t* w, int64_t K2,
                                                                                     at::BFloat16* out) {
  const VbmiWidener widener = vbmi_widener();
  for (int64_t kk = 0; kk < K2; kk += 2) {
    __m512i w0, w1;
    vbmi_widen(widener, _mm512_loadu_si512(w + kk * 32), w0, w1);
    _mm512_storeu_si512(out + kk * 32, w0);
    _mm512_storeu_si512(out + (kk + 1) * 32, w1);
  }
}

// y[m] += c[m] * ws for `rows` rows of float32 sums c [rows][16].
__attribute__((target("avx512f"))) inline void scale_float_sums(const float* c, int64_t rows, const float* ws, float* y) {
  const __m512 s = _mm512_loadu_ps(ws);
  for (int64_t m = 0; m < rows; ++m)
    _mm512_storeu_ps(y + m * 16, _mm512_fmadd_ps(_mm512_loadu_ps(c + m * 16), s, _mm512_loadu_ps(y + m * 16)));
}

// y [rows, 16] on the tiles for one widened block (K and the group multiples of 32).
inline void amx_fp8_gemm(int64_t rows, const at::BFloat16* x, int64_t ldx, const at::BFloat16* wide, int64_t K,
                         int64_t group, const float* ws, float* y) {
  alignas(64) float c[2 * kTileRows * 16];
  std::fill(y, y + rows * 16, 0.0f);
  tile_rows(rows, [&](int64_t m0, bool two_tiles) {
    const int64_t left = std::min<int64_t>(2 * kTileRows, rows - m0);
    for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += group) {
      const int64_t kg = std::min(group, K - k0);
      if (two_tiles)
        amx_bf16_tiles<2, 1>(x + m0 * ldx + k0, ldx, wide + k0 * 16, nullptr, kg, c, nullptr, 16);
      else
        amx_bf16_tiles<1, 1>(x + m0 * ldx + k0, ldx, wide + k0 * 16, nullptr, kg, c, nullptr, 16);
      scale_float_sums(c, left, ws + g * kFp8BlockN, y + m0 * 16);
    }
  });
}

// Rows from which the AMX path pays for its widening of the whole block into a buffer (the vector
// kernels widen it once per 8 rows, in registers): 4096 x 1024, 1 row 338 against 518 us on the tiles,
// 4 rows 416 against 574, 8 rows 708 against 608.
constexpr int64_t kFp8AmxMinRows = 6;

// y [rows, 16] for one packed block and any number of rows, in tiles of 8 rows (or on AMX tiles where
// `amx` and the shapes allow); `vbmi`: the block is packed for tile_fp8_vbmi.
inline void block_fp8_gemm(bool vbmi, bool amx, int64_t rows, const at::BFloat16* x, int64_t ldx, const uint8_t* w,
                           int64_t K2, int64_t group2, const float* ws, float* y) {
  if (amx && rows >= kFp8AmxMinRows && (2 * K2) % kTileK16 == 0 && (2 * group2) % kTileK16 == 0) {
    thread_local std::vector<at::BFloat16> wide;
    wide.resize(2 * K2 * kFp8BlockN);
    if (vbmi)
      widen_block_vbmi(w, K2, wide.data());
    else
      widen_block(w, K2, wide.data());
    return amx_fp8_gemm(rows, x, ldx, wide.data(), 2 * K2, 2 * group2, ws, y);
  }
  for (int64_t m0 = 0; m0 < rows; m0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, rows - m0));
    tile_fp8<8>(vbmi, n, x + m0 * ldx, ldx, w, K2, group2, ws, y + m0 * kFp8BlockN);
  }
}

// 8 e4m3fn bytes -> 8 float32, as e4m3_to_bf16 widens them (normals re-biased by +120 in the exponent,
// subnormals m x 2^-9 computed exactly).
__attribute__((target("avx2,fma"))) inline __m256 e4m3_to_f32(__m128i bytes8) {
  const __m256i b = _mm256_cvtepu8_epi32(bytes8);
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7f)), 20),
                                          _mm256_set1_epi32(120 << 23));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(7))),
                                   _mm256_set1_ps(1.0f / 512.0f));
  const __m256 is_sub = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x78)), _mm256_setzero_si256()));
  const __m256 v = _mm256_blendv_ps(_mm256_castsi256_ps(normal), sub, is_sub);
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  return _mm256_or_ps(v, _mm256_castsi256_ps(sign));
}

// The float32 variant of tile_fp8_dpbf16 on the same packed block: each 8-byte quarter of a group of
// 2 k holds 4 columns x 2 k; the lanes keep the two k apart (x broadcast as [x0 x1] x 4) and are added
// in pairs when the scale group ends.
template <int ROWS>
__attribute__((target("avx2,fma"))) void tile_fp8_avx2(
    const float* x, int64_t ldx, const uint8_t* w, int64_t K2, int64_t group2, const float* ws, float* y) {
  for (int m = 0; m < ROWS; ++m)
    for (int j = 0; j < kFp8BlockN; ++j) y[m * kFp8BlockN + j] = 0.0f;
  for (int64_t g = 0, k0 = 0; k0 < K2; ++g, k0 += group2) {
    const int64_t k1 = std::min(K2, k0 + group2);
    __m256 a[ROWS][4];
    for (int m = 0; m < ROWS; ++m)
      for (int q = 0; q < 4; ++q) a[m][q] = _mm256_setzero_ps();
    for (int64_t kk = k0; kk < k1; ++kk) {
      __m256 wq[4];
      for (int q = 0; q < 4; ++q)
        wq[q] = e4m3_to_f32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + kk * 32 + q * 8)));
      for (int m = 0; m < ROWS; ++m) {
        const __m256 xv = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x + m * ldx + 2 * kk)));
        for (int q = 0; q < 4; ++q) a[m][q] = _mm256_fmadd_ps(wq[q], xv, a[m][q]);
      }
    }
    for (int m = 0; m < ROWS; ++m)
      for (int q = 0; q < 4; ++q) {
        alignas(32) float lanes[8];  // [c0 k0, c0 k1, c1 k0, c1 k1, ...] of the quarter's 4 columns
        _mm256_store_ps(lanes, a[m][q]);
        for (int c = 0; c < 4; ++c) {
          const int j = q * 4 + c;
          y[m * kFp8BlockN + j] += (lanes[2 * c] + lanes[2 * c + 1]) * ws[g * kFp8BlockN + j];
        }
      }
  }
}

template <int ROWS>
inline void tile_fp8_f32(int rows, const float* x, int64_t ldx, const uint8_t* w, int64_t K2, int64_t group2,
                         const float* ws, float* y) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return tile_fp8_f32<ROWS - 1>(rows, x, ldx, w, K2, group2, ws, y);
  }
  tile_fp8_avx2<ROWS>(x, ldx, w, K2, group2, ws, y);
}

// float32 activations: tiles of 2 rows (four accumulators a row stay in AVX2's 16 registers); the
// packing is never the VBMI one.
inline void block_fp8_gemm(bool /*vbmi*/, bool /*amx*/, int64_t rows, const float* x, int64_t ldx, const uint8_t* w, int64_t K2, int64_t group2,
                           const float* ws, float* y) {
  for (int64_t m0 = 0; m0 < rows; m0 += 2) {
    const int n = static_cast<int>(std::min<int64_t>(2, rows - m0));
    tile_fp8_f32<2>(n, x + m0 * ldx, ldx, w, K2, group2, ws, y + m0 * kFp8BlockN);
  }
}

}  // namespace dsserve_cpu
