// MLA decode on the paged latent cache: each new token's absorbed query (kv_lora_rank + rope wide,
// every head) against every cached token's latent row, read once per step for all heads.
//
// Work is split over (sequence, KV chunk) pairs, so one long sequence (batch 1) keeps every thread
// busy (flash-decoding); each pair keeps a running max, sum and float32 accumulator per head, and a
// second pass merges the chunks of a sequence. Chunks are `chunk_tokens` long from position 0, so
// a sequence's result depends on its own length and that one number only: the caller keeps it fixed
// for batch-invariant results (--enable-deterministic-inference). Tokens go in blocks of kTokens: a block's latent rows
// are widened to float32 once, then scored against all heads (q transposed, heads in the vector
// lanes) and added into all heads' outputs.
// On AVX512-BF16 CPUs a bfloat16 cache takes the dot-product path (`item_dpbf16`): scores and the
// weighted sum are vdpbf16ps products with float32 sums, the softmax is vectorized across heads, and
// the probabilities are rounded to bfloat16 for the weighted sum as FlashMLA rounds them (16 heads,
// 1000 cached tokens, one sequence on a Zen 4: 528 -> 173 us; 16 sequences of 50 tokens: 441 -> 189 us). Elsewhere the inner loops are plain C++ compiled
// for AVX-512, AVX2 and baseline x86 (target_clones: the loader picks the clone at run time).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
#include <vector>

#include "block_gemm.h"

namespace dsserve_cpu {
namespace {

constexpr int64_t kTokens = 16;  // tokens per block: their rows stay in L1 between scores and sums
constexpr int64_t kChunkL = 64;  // latent columns of one head's accumulator held in registers

#define DSSERVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// scores[h] = scale * q[h] . row for a group of kHeads heads, from the group's q transposed
// (q_t[w][h]): the heads ride the vector lanes (one register holds all kHeads sums) and each element
// of the row is broadcast once, so there is neither a horizontal reduction nor a transposed row.
constexpr int64_t kHeads = 16;

DSSERVE_CLONES void row_scores(const float* q_t, const float* row, int64_t W, float scale, float* scores) {
  float s[kHeads] = {};
  for (int64_t w = 0; w < W; ++w) {
    const float rw = row[w];
#pragma omp simd
    for (int64_t h = 0; h < kHeads; ++h) s[h] += rw * q_t[w * kHeads + h];
  }
  for (int64_t h = 0; h < kHeads; ++h) scores[h] = s[h] * scale;
}

// acc[i] = acc[i] * keep + sum_t p[t] * rows[t][i] for i < L, kChunkL columns at a time: a fixed
// trip count lets the compiler hold the chunk in registers across the tokens, and always_inline
// compiles it for the calling clone's ISA (measured: 980 -> 555 us for 16 sequences of 50 tokens).
template <int64_t N>
__attribute__((always_inline)) inline void accumulate_chunk(float* acc, float keep, const float* p,
                                                         const float* rows, int64_t count, int64_t W) {
  float a[N];
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) a[i] = acc[i] * keep;
  for (int64_t t = 0; t < count; ++t) {
    const float pt = p[t];
    const float* row = rows + t * W;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) a[i] += pt * row[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) acc[i] = a[i];
}

DSSERVE_CLONES void block_accumulate(float* acc, float keep, const float* p, const float* rows, int64_t count,
                                     int64_t W, int64_t L) {
  int64_t l0 = 0;
  for (; l0 + kChunkL <= L; l0 += kChunkL) accumulate_chunk<kChunkL>(acc + l0, keep, p, rows + l0, count, W);
  for (; l0 + 16 <= L; l0 += 16) accumulate_chunk<16>(acc + l0, keep, p, rows + l0, count, W);
  for (; l0 < L; ++l0) accumulate_chunk<1>(acc + l0, keep, p, rows + l0, count, W);
}

// bfloat16 -> float32 is a 16-bit shift: written on the raw bits so that it vectorizes.
DSSERVE_CLONES void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = __builtin_bit_cast(float, static_cast<uint32_t>(src[i]) << 16);
}

inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  widen_bf16(reinterpret_cast<const uint16_t*>(src), dst, n);
}

inline void widen(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

struct Partial {  // one (sequence, chunk)'s softmax state for every head
  std::vector<float> max, sum, acc;  // [H], [H], [H * L]
};

// ------------------------------------------------------------------- AVX512-BF16 dot products

// o[j * 16 .. +16] (NJ vectors of 16 latent columns) = o * keep + sum over token pairs of
// (p[2i], p[2i+1]) . (rows 2i, 2i+1 of the block, interleaved: rp[i][l][2]).
template <int NJ>
__attribute__((target("avx512f,avx512bf16"))) inline void weighted_sum(float* o, float keep, const int32_t* pairs,
                                                                     int64_t npairs, const uint16_t* rp, int64_t L) {
  __m512 acc[NJ];
  const __m512 k = _mm512_set1_ps(keep);
  for (int j = 0; j < NJ; ++j) acc[j] = _mm512_mul_ps(_mm512_loadu_ps(o + j * 16), k);
  for (int64_t i = 0; i < npairs; ++i) {
    const __m512bh pv = (__m512bh)_mm512_set1_epi32(pairs[i]);
    for (int j = 0; j < NJ; ++j)
      acc[j] = _mm512_dpbf16_ps(acc[j], pv, (__m512bh)_mm512_loadu_si512(rp + (i * L + j * 16) * 2));
  }
  for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(o + j * 16, acc[j]);
}

// One (sequence, chunk of tokens [t0, t1)) on the latent cache, 16 heads a group in the vector lanes.
// q [H, W] bfloat16; `slot(t)` the cache row of token t. W even and L a multiple of 32 (the caller checks).
template <typename Slot>
__attribute__((target("avx512f,avx512bf16"))) void item_dpbf16(const at::BFloat16* q, const at::BFloat16* cache,
                                                              const Slot& slot, int64_t t0, int64_t t1, int64_t H,
                                                              int64_t W, int64_t L, float scale, Partial& part) {
  const int64_t groups = (H + kHeads - 1) / kHeads, W2 = W / 2;
  // q as (w, w+1) pairs with the heads in the lanes: qp[g][w / 2][h]
  std::vector<int32_t> qp(groups * W2 * kHeads, 0);
  const uint16_t* qb = reinterpret_cast<const uint16_t*>(q);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W2; ++w)
      qp[((h / kHeads) * W2 + w) * kHeads + h % kHeads] =
          static_cast<int32_t>(qb[h * W + 2 * w] | static_cast<uint32_t>(qb[h * W + 2 * w + 1]) << 16);
  const int64_t Hp = groups * kHeads;
  part.max.assign(Hp, -std::numeric_limits<float>::infinity());
  part.sum.assign(Hp, 0.0f);
  part.acc.assign(Hp * L, 0.0f);
  std::vector<uint16_t> zeros(W, 0), rp(kTokens * L);  // the block's latent columns, token pairs interleaved
  const __m512i lo_order = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi_order = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  alignas(64) float probs[kTokens][kHeads];
  alignas(64) float keep[kHeads];
  int32_t pairs[kTokens / 2];
  const uint16_t* rows[kTokens];
  for (int64_t s0 = t0; s0 < t1; s0 += kTokens) {
    const int64_t count = std::min(kTokens, t1 - s0), npairs = (count + 1) / 2;
    for (int64_t i = 0; i < kTokens; ++i)
      rows[i] = i < count ? reinterpret_cast<const uint16_t*>(cache + slot(s0 + i) * W) : zeros.data();
    for (int64_t i = 0; i < npairs; ++i)  // interleave rows 2i and 2i+1, 32 columns at a time
      for (int64_t l = 0; l < L; l += 32) {
        const __m512i a = _mm512_loadu_si512(rows[2 * i] + l), b = _mm512_loadu_si512(rows[2 * i + 1] + l);
        const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
        _mm512_storeu_si512(rp.data() + (i * L + l) * 2, _mm512_permutex2var_epi64(lo, lo_order, hi));
        _mm512_storeu_si512(rp.data() + (i * L + l + 16) * 2, _mm512_permutex2var_epi64(lo, hi_order, hi));
      }
    for (int64_t g = 0; g < groups; ++g) {
      const int32_t* qg = qp.data() + g * W2 * kHeads;
      __m512 sc[kTokens];
      for (int64_t i = 0; i < count; i += 4) {  // four tokens share each load of q
        const int32_t* r[4];
        for (int j = 0; j < 4; ++j) r[j] = reinterpret_cast<const int32_t*>(rows[std::min(i + j, count - 1)]);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t w = 0; w < W2; ++w) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(qg + w * kHeads);
          a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32(r[0][w]), qv);
          a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32(r[1][w]), qv);
          a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_set1_epi32(r[2][w]), qv);
          a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_set1_epi32(r[3][w]), qv);
        }
        const __m512 sv = _mm512_set1_ps(scale);
        sc[i] = _mm512_mul_ps(a0, sv);
        if (i + 1 < count) sc[i + 1] = _mm512_mul_ps(a1, sv);
        if (i + 2 < count) sc[i + 2] = _mm512_mul_ps(a2, sv);
        if (i + 3 < count) sc[i + 3] = _mm512_mul_ps(a3, sv);
      }
      // online softmax, every head of the group at once
      __m512 block_max = sc[0];
      for (int64_t i = 1; i < count; ++i) block_max = _mm512_max_ps(block_max, sc[i]);
      const __m512 old_max = _mm512_loadu_ps(part.max.data() + g * kHeads);
      const __m512 new_max = _mm512_max_ps(old_max, block_max);
      const __m512 kv = exp16(_mm512_sub_ps(old_max, new_max));
      __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(part.sum.data() + g * kHeads), kv);
      for (int64_t i = 0; i < 2 * npairs; ++i) {
        const __m512 p = i < count ? exp16(_mm512_sub_ps(sc[i], new_max)) : _mm512_setzero_ps();
        sum = _mm512_add_ps(sum, p);
        _mm512_store_ps(probs[i], p);
      }
      _mm512_storeu_ps(part.max.data() + g * kHeads, new_max);
      _mm512_storeu_ps(part.sum.data() + g * kHeads, sum);
      _mm512_store_ps(keep, kv);
      for (int64_t h = 0; h < kHeads && g * kHeads + h < H; ++h) {
        for (int64_t i = 0; i < npairs; ++i)
          pairs[i] = static_cast<int32_t>(bf16_bits(probs[2 * i][h]) | static_cast<uint32_t>(bf16_bits(probs[2 * i + 1][h])) << 16);
        float* o = part.acc.data() + (g * kHeads + h) * L;
        int64_t l = 0;
        for (; l + 128 <= L; l += 128) weighted_sum<8>(o + l, keep[h], pairs, npairs, rp.data() + l * 2, L);
        for (; l < L; l += 32) weighted_sum<2>(o + l, keep[h], pairs, npairs, rp.data() + l * 2, L);
      }
    }
  }
}

template <typename T>
at::Tensor mla_decode_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& page_table,
                           const at::Tensor& seq_lens, int64_t page_size, int64_t rank, double scale,
                           int64_t chunk_tokens, Isa isa) {
  const int64_t B = q.size(0), H = q.size(1), W = q.size(2), L = rank;
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  const int32_t* pages = page_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t max_pages = page_table.size(1);
  // the work items: sequence b owns items first[b] .. first[b + 1] - 1, one per chunk (at least one)
  std::vector<int64_t> first(B + 1, 0), owner;
  for (int64_t b = 0; b < B; ++b) {
    first[b + 1] = first[b] + std::max<int64_t>(1, (lens[b] + chunk_tokens - 1) / chunk_tokens);
    owner.insert(owner.end(), first[b + 1] - first[b], b);
  }
  std::vector<Partial> parts(first[B]);
  const bool dot_products = isa >= kAvx512Bf16 && W % 2 == 0 && L % 32 == 0;

  at::parallel_for(0, first[B], 1, [&](int64_t begin, int64_t end) {
    const int64_t groups = (H + kHeads - 1) / kHeads, Hp = groups * kHeads;  // heads padded to whole groups
    std::vector<float> qf(H * W), q_t(groups * W * kHeads), rows(kTokens * W), scores(kTokens * Hp), p(kTokens);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = owner[item], c = item - first[b], n = lens[b];
      const int64_t t0 = std::min(n, c * chunk_tokens), t1 = std::min(n, t0 + chunk_tokens);
      Partial& part = parts[item];
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (dot_products) {
          const auto slot = [&](int64_t pos) {
            return static_cast<int64_t>(pages[b * max_pages + pos / page_size]) * page_size + pos % page_size;
          };
          item_dpbf16(qp + b * H * W, cp, slot, t0, t1, H, W, L, static_cast<float>(scale), part);
          continue;
        }
      }
      part.max.assign(H, -std::numeric_limits<float>::infinity());
      part.sum.assign(H, 0.0f);
      part.acc.assign(H * L, 0.0f);
      if (t0 >= t1) continue;
      widen(qp + b * H * W, qf.data(), H * W);
      std::fill(q_t.begin(), q_t.end(), 0.0f);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) q_t[((h / kHeads) * W + w) * kHeads + h % kHeads] = qf[h * W + w];
      for (int64_t s = t0; s < t1; s += kTokens) {
        const int64_t count = std::min(kTokens, t1 - s);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t pos = s + i;
          const int64_t slot = static_cast<int64_t>(pages[b * max_pages + pos / page_size]) * page_size + pos % page_size;
          widen(cp + slot * W, rows.data() + i * W, W);
          for (int64_t g = 0; g < groups; ++g)
            row_scores(q_t.data() + g * W * kHeads, rows.data() + i * W, W, static_cast<float>(scale),
                       scores.data() + i * Hp + g * kHeads);
        }
        for (int64_t h = 0; h < H; ++h) {
          float block_max = -std::numeric_limits<float>::infinity();
          for (int64_t i = 0; i < count; ++i) block_max = std::max(block_max, scores[i * Hp + h]);
          const float new_max = std::max(part.max[h], block_max);
          const float keep = std::exp(part.max[h] - new_max);  // 0 on the first block (max was -inf)
          float block_sum = 0.0f;
          for (int64_t i = 0; i < count; ++i) block_sum += p[i] = std::exp(scores[i * Hp + h] - new_max);
          part.sum[h] = part.sum[h] * keep + block_sum;
          part.max[h] = new_max;
          block_accumulate(part.acc.data() + h * L, keep, p.data(), rows.data(), count, W, L);
        }
      }
    }
  });

  at::Tensor out = at::empty({B, H, L}, q.options());
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(L);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = first[b]; c < first[b + 1]; ++c) top = std::max(top, parts[c].max[h]);
      std::fill(merged.begin(), merged.end(), 0.0f);
      float total = 0.0f;
      for (int64_t c = first[b]; c < first[b + 1]; ++c) {
        const Partial& part = parts[c];
        if (part.sum[h] == 0.0f) continue;
        const float w = std::exp(part.max[h] - top);
        total += w * part.sum[h];
        const float* acc = part.acc.data() + h * L;
        for (int64_t i = 0; i < L; ++i) merged[i] += w * acc[i];
      }
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      for (int64_t i = 0; i < L; ++i) op[(b * H + h) * L + i] = static_cast<T>(merged[i] * inv);
    }
  });
  return out;
}

}  // namespace

// q [B, H, W] (the absorbed query: kv_lora_rank latent then rope); cache [slots, W] (flat pages);
// page_table [B, max_pages] int32; seq_lens [B] int32 (tokens in the cache, the new one written);
// chunk_tokens: the KV chunk one work item takes (a multiple of 16 keeps token blocks aligned);
// isa: the variant (block_gemm.h's numbering; AVX512_BF16 takes the dot-product path for bfloat16);
// returns [B, H, rank] in q's dtype: softmax(scale * q . row) weighted sum of the rows' latent part.
at::Tensor mla_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& page_table,
                      const at::Tensor& seq_lens, int64_t page_size, int64_t rank, double scale,
                      int64_t chunk_tokens, int64_t isa) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [B, H, W] tensor");
  TORCH_CHECK(cache.dim() == 2 && cache.is_contiguous() && cache.size(1) == q.size(2),
              "cache must be the flat [slots, W] latent cache of q's width");
  TORCH_CHECK(cache.scalar_type() == q.scalar_type(), "q and the cache must share a dtype");
  TORCH_CHECK(page_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "page_table and seq_lens must be int32");
  TORCH_CHECK(rank > 0 && rank <= q.size(2) && chunk_tokens >= 1, "bad rank or chunk length");
  const at::Tensor table = page_table.contiguous(), lens = seq_lens.contiguous();
  switch (q.scalar_type()) {
    case at::kBFloat16:
      return mla_decode_impl<at::BFloat16>(q, cache, table, lens, page_size, rank, scale, chunk_tokens, static_cast<Isa>(isa));
    case at::kFloat:
      return mla_decode_impl<float>(q, cache, table, lens, page_size, rank, scale, chunk_tokens, static_cast<Isa>(isa));
    default:
      TORCH_CHECK(false, "mla_decode serves bfloat16 and float32, not ", q.scalar_type());
  }
}

}  // namespace dsserve_cpu
