// AMX tile kernels on the packed layouts of block_gemm.h (bfloat16) and int8_gemm.h (int8).
//
// Those layouts are already AMX's: an AMX B tile is 16 rows of 64 bytes, each row one k-pair
// (bfloat16) or k-quad (int8) of 16 columns, which is exactly 32 (or 64) consecutive k of a packed
// block of 16 columns; so the weights packed at load feed vdpbf16ps/vpdpbusd on AVX-512 CPUs and
// tdpbf16ps/tdpbusd on AMX CPUs alike. An A tile is 16 rows of x, 64 bytes of each (32 bfloat16 or
// 64 int8 k); a C tile 16 rows of 16 float32 (or int32) sums.
//
// A kernel here configures the tiles when it starts and releases them when it ends, or, inside a
// TileScope, when the scope closes: oneDNN, which torch calls for its own matmuls, configures the tiles
// its own way on the same threads, so nothing may assume a configuration across torch ops. A tail of fewer than 16 rows is configured as a shorter tile (no
// copy); a K that is not a multiple of the tile's is left to the caller (the AVX-512 kernels finish it).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <algorithm>
#include <cstring>

namespace dsserve_cpu {

constexpr int64_t kTileRows = 16;
constexpr int64_t kTileK16 = 32;  // bfloat16 k per A-tile row
constexpr int64_t kTileK8 = 64;   // int8 k per A-tile row
// How far ahead every kernel streaming packed weights prefetches them (two 1 KB tiles): tile loads from
// memory are not followed by the hardware prefetchers as vector loads are (4096 x 1024 bfloat16 on the
// tiles, one row: 354 -> 319 us, 16 rows 403 -> 381 us), and the vector loops gain too (e4m3 widening,
// one row: 270 -> 208 us; vdpbf16ps at 4 rows 532 -> 349 us).
constexpr int64_t kPrefetchBytes = 2048;

// Linux hands a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction raises SIGILL. Asked once per process.
inline bool amx_permitted() {
  static const bool permitted = [] {
#ifdef __linux__
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return permitted;
}

// A kernel asked for AMX in a process that was not granted the tile state would die of SIGILL.
inline void check_amx(bool wanted) {
  TORCH_CHECK(!wanted || amx_permitted(), "AMX kernels asked for, but this process may not use AMX");
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0, 1 (sums) and 4 (x) get `first` rows, tiles 2, 3 and 5 (the second tile of rows) `second`,
// 6 and 7 (weights) 16; every row is 64 bytes.
__attribute__((target("amx-tile"))) inline void configure_tiles(int first, int second) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64;
  config.rows[0] = config.rows[1] = config.rows[4] = static_cast<uint8_t>(first);
  config.rows[2] = config.rows[3] = config.rows[5] = static_cast<uint8_t>(second);
  config.rows[6] = config.rows[7] = kTileRows;
  _tile_loadconfig(&config);
}

// The tiles' state on this thread: the row count they are configured for (-1: none), and whether a
// TileScope is open (the tiles then stay configured between kernel calls until it closes).
struct TileState {
  int configured = -1;
  bool scoped = false;
};
inline thread_local TileState tile_state;

__attribute__((target("amx-tile"))) inline void release_tiles() {
  _tile_release();
  tile_state.configured = -1;
}

// Opened by a caller around a loop of kernel calls on one thread (one parallel chunk): the tiles are
// configured once for the loop rather than once per call, which is ~20% of a call whose K is 128
// (MLA's per-head absorption at one row). No torch op may run inside one (oneDNN reconfigures).
class TileScope {
 public:
  TileScope() : outer_(tile_state.scoped) { tile_state.scoped = true; }
  ~TileScope() {
    if (outer_) return;
    tile_state.scoped = false;
    if (tile_state.configured >= 0) release_tiles();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  bool outer_;
};

// Walks `rows` in steps of up to two tiles of 16, configuring the tiles for each step's row count
// where they are not already, then releases them unless a TileScope is open: step(m0, two_tiles).
template <typename Step>
__attribute__((target("amx-tile"))) inline void tile_rows(int64_t rows, const Step& step) {
  for (int64_t m0 = 0; m0 < rows; m0 += 2 * kTileRows) {
    const int left = static_cast<int>(std::min<int64_t>(2 * kTileRows, rows - m0));
    if (left != tile_state.configured) {
      configure_tiles(std::min<int>(left, kTileRows), left > kTileRows ? left - kTileRows : kTileRows);
      tile_state.configured = left;
    }
    step(m0, left > kTileRows);
  }
  if (!tile_state.scoped) release_tiles();
}

// ------------------------------------------------------------------------------ bfloat16 weights

// C[MT tiles of rows][NB blocks of 16 columns] = x W^T over K (a multiple of 32) for MT (1, 2) tiles of
// rows and NB (1, 2) packed blocks; tiles 0-3 accumulate, 4-5 hold x, 6-7 the weights.
template <int MT, int NB>
__attribute__((target("amx-tile,amx-bf16"))) void amx_bf16_tiles(const at::BFloat16* x, int64_t ldx,
                                                                 const at::BFloat16* w0, const at::BFloat16* w1,
                                                                 int64_t K, float* out0, float* out1, int64_t ldo) {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (MT == 2) _tile_zero(2);
  if constexpr (MT == 2 && NB == 2) _tile_zero(3);
  const int64_t stride = ldx * static_cast<int64_t>(sizeof(at::BFloat16));
  for (int64_t k0 = 0; k0 < K; k0 += kTileK16) {
    for (int line = 0; line < 16; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + k0 * 16) + kPrefetchBytes + line * 64, _MM_HINT_T0);
      if constexpr (NB == 2)
        _mm_prefetch(reinterpret_cast<const char*>(w1 + k0 * 16) + kPrefetchBytes + line * 64, _MM_HINT_T0);
    }
    _tile_loadd(6, w0 + k0 * 16, 64);
    if constexpr (NB == 2) _tile_loadd(7, w1 + k0 * 16, 64);
    _tile_loadd(4, x + k0, stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) {
      _tile_loadd(5, x + kTileRows * ldx + k0, stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t out_stride = ldo * static_cast<int64_t>(sizeof(float));
  _tile_stored(0, out0, out_stride);
  if constexpr (NB == 2) _tile_stored(1, out1, out_stride);
  if constexpr (MT == 2) _tile_stored(2, out0 + kTileRows * ldo, out_stride);
  if constexpr (MT == 2 && NB == 2) _tile_stored(3, out1 + kTileRows * ldo, out_stride);
}

// out0 (and out1 for NB = 2) [rows, 16] with row stride ldo = x W^T over the first K_tiles (a multiple of
// 32) of K, for any number of rows.
template <int NB>
__attribute__((target("amx-tile,amx-bf16"))) void amx_bf16_gemm(int64_t rows, const at::BFloat16* x, int64_t ldx,
                                                                const at::BFloat16* w0, const at::BFloat16* w1,
                                                                int64_t K_tiles, float* out0, float* out1, int64_t ldo) {
  tile_rows(rows, [&](int64_t m0, bool two_tiles) {
    if (two_tiles)
      amx_bf16_tiles<2, NB>(x + m0 * ldx, ldx, w0, w1, K_tiles, out0 + m0 * ldo, out1 + m0 * ldo, ldo);
    else
      amx_bf16_tiles<1, NB>(x + m0 * ldx, ldx, w0, w1, K_tiles, out0 + m0 * ldo, out1 + m0 * ldo, ldo);
  });
}

// ---------------------------------------------------------------------------------- int8 weights

// The int32 sums of MT (1, 2) tiles of rows of biased (u8) activations against one packed int8 block,
// over `quads` k-quads (a multiple of 16) from k-quad 0 of both, stored to c [MT * 16][16].
template <int MT>
__attribute__((target("amx-tile,amx-int8"))) void amx_int8_tiles(const uint8_t* x, int64_t ldx, const int8_t* w,
                                                                 int64_t quads, int32_t* c) {
  _tile_zero(0);
  if constexpr (MT == 2) _tile_zero(2);
  for (int64_t q0 = 0; q0 < quads; q0 += kTileK8 / 4) {
    for (int line = 0; line < 16; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(w + q0 * 64) + kPrefetchBytes + line * 64, _MM_HINT_T0);
    _tile_loadd(6, w + q0 * 64, 64);
    _tile_loadd(4, x + q0 * 4, ldx);
    _tile_dpbusd(0, 4, 6);
    if constexpr (MT == 2) {
      _tile_loadd(5, x + kTileRows * ldx + q0 * 4, ldx);
      _tile_dpbusd(2, 5, 6);
    }
  }
  _tile_stored(0, c, 64);
  if constexpr (MT == 2) _tile_stored(2, c + kTileRows * 16, 64);
}

// y[m] += (c[m] - comp) * ws * sx[m * lds] for `rows` rows of int32 sums c [rows][16].
__attribute__((target("avx512f"))) inline void scale_int8_sums(const int32_t* c, int64_t rows, const int32_t* comp,
                                                              const float* ws, const float* sx, int64_t lds, float* y) {
  const __m512i cv = _mm512_loadu_si512(comp);
  const __m512 s = _mm512_loadu_ps(ws);
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(c + m * 16), cv));
    _mm512_storeu_ps(y + m * 16, _mm512_fmadd_ps(sum, _mm512_mul_ps(s, _mm512_set1_ps(sx[m * lds])),
                                                 _mm512_loadu_ps(y + m * 16)));
  }
}

// y [rows, 16] = the scaled sums of `rows` rows of biased activations (x, row stride ldx; group scales
// sx, row stride lds) against one packed block (K4 k-quads in groups of group4, both multiples of 16;
// comp and ws [groups][16] as int8_gemm.h's tile_int8_vnni takes them).
inline void amx_int8_gemm(int64_t rows, const uint8_t* x, int64_t ldx, const float* sx, int64_t lds, const int8_t* w,
                          int64_t K4, int64_t group4, const int32_t* comp, const float* ws, float* y) {
  alignas(64) int32_t c[2 * kTileRows * 16];
  std::memset(y, 0, rows * 16 * sizeof(float));
  tile_rows(rows, [&](int64_t m0, bool two_tiles) {
    const int64_t left = std::min<int64_t>(2 * kTileRows, rows - m0);
    for (int64_t g = 0, q0 = 0; q0 < K4; ++g, q0 += group4) {
      const int64_t quads = std::min(group4, K4 - q0);
      if (two_tiles)
        amx_int8_tiles<2>(x + m0 * ldx + q0 * 4, ldx, w + q0 * 64, quads, c);
      else
        amx_int8_tiles<1>(x + m0 * ldx + q0 * 4, ldx, w + q0 * 64, quads, c);
      scale_int8_sums(c, left, comp + g * 16, ws + g * 16, sx + m0 * lds + g, lds, y + m0 * 16);
    }
  });
}

}  // namespace dsserve_cpu
