// Expert routing of one MoE layer in one call: scoring, grouped top-k, normalisation and scaling of
// every token, as dsserve.core.reference.select_experts does it in ~15 small torch ops (about 70 us a
// layer at batch 1 on the bench model; this: a few).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace dsserve_cpu {

enum Scoring : int64_t { kSoftmax = 0, kSigmoid = 1 };
enum TopkMethod : int64_t { kGreedy = 0, kGroupLimitedGreedy = 1, kNoauxTc = 2 };

namespace {

// The indices of the k largest values (ties: the lower index first, like a stable sort).
void top_k(const float* v, int64_t n, int64_t k, int64_t* out, std::vector<int64_t>& order) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  std::copy(order.begin(), order.begin() + k, out);
}

}  // namespace

// logits [T, E] float32; bias [E] float32 (noaux_tc) or an empty tensor. Returns (weights [T, k]
// float32, ids [T, k] int64) as select_experts defines them.
std::vector<at::Tensor> route(const at::Tensor& logits, const at::Tensor& bias, int64_t scoring, int64_t method,
                              int64_t n_group, int64_t topk_group, int64_t top_k_, bool norm, double scaling) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "logits must be float32 [T, E]");
  const at::Tensor x = logits.contiguous();
  const int64_t T = x.size(0), E = x.size(1), k = top_k_;
  const bool biased = method == kNoauxTc && bias.defined() && bias.numel() == E;
  const at::Tensor b = biased ? bias.to(at::kFloat).contiguous() : at::Tensor();
  const bool grouped = method != kGreedy && n_group > 1 && topk_group < n_group;
  TORCH_CHECK(!grouped || E % n_group == 0, E, " experts do not split into ", n_group, " groups");
  at::Tensor weights = at::empty({T, k}, x.options());
  at::Tensor ids = at::empty({T, k}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  const float* bp = biased ? b.data_ptr<float>() : nullptr;
  float* wp = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(E), choice(E), group_scores(n_group);
    std::vector<int64_t> order, kept(topk_group), chosen(k);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * E;
      if (scoring == kSoftmax) {
        const float mx = *std::max_element(row, row + E);
        float sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(row[e] - mx));
        for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
      } else {
        for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-row[e]));
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = biased ? scores[e] + bp[e] : scores[e];
      if (grouped) {
        const int64_t per = E / n_group;
        for (int64_t g = 0; g < n_group; ++g) {
          const float* c = choice.data() + g * per;
          if (method == kGroupLimitedGreedy) {
            group_scores[g] = *std::max_element(c, c + per);
          } else {  // noaux_tc: the sum of the group's two best
            int64_t two[2];
            const int64_t n2 = std::min<int64_t>(2, per);
            top_k(c, per, n2, two, order);
            group_scores[g] = c[two[0]] + (n2 > 1 ? c[two[1]] : 0.0f);
          }
        }
        top_k(group_scores.data(), n_group, topk_group, kept.data(), order);
        std::vector<bool> keep(n_group, false);
        for (int64_t g : kept) keep[g] = true;
        for (int64_t e = 0; e < E; ++e)
          if (!keep[e / per]) choice[e] = -std::numeric_limits<float>::infinity();
      }
      top_k(choice.data(), E, k, chosen.data(), order);
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) sum += scores[chosen[j]];
      for (int64_t j = 0; j < k; ++j) {
        const float w = scores[chosen[j]];
        wp[t * k + j] = (norm ? w / (sum + 1e-20f) : w) * static_cast<float>(scaling);
        ip[t * k + j] = chosen[j];
      }
    }
  });
  return {weights, ids};
}

}  // namespace dsserve_cpu
