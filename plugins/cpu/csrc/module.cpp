// The Python module of the cpu plugin's kernels: one entry per kernel file.
#include <torch/extension.h>

namespace dsserve_cpu {
at::Tensor fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                     const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t isa);
at::Tensor fused_moe_int8(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w13_comp,
                          const at::Tensor& w13_scale, const at::Tensor& w2, const at::Tensor& w2_comp,
                          const at::Tensor& w2_scale, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                          int64_t group1, int64_t group2, int64_t isa);
at::Tensor fused_moe_fp8(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w13_scale,
                         const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                         const at::Tensor& topk_ids, int64_t group, bool vbmi, bool amx);
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                      const c10::optional<at::Tensor>& bias, int64_t group, bool float_out, bool vbmi, bool amx);
std::vector<at::Tensor> route(const at::Tensor& logits, const at::Tensor& bias, int64_t scoring, int64_t method,
                              int64_t n_group, int64_t topk_group, int64_t top_k, bool norm, double scaling);
at::Tensor mla_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& page_table,
                      const at::Tensor& seq_lens, int64_t page_size, int64_t rank, double scale, int64_t chunk_tokens,
                      int64_t isa);
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         int64_t isa);
at::Tensor head_linear(const at::Tensor& x, const at::Tensor& w, int64_t isa);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual,
                    const c10::optional<at::Tensor>& out);
void rotary(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
            bool interleaved);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp,
                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t group, int64_t isa);
}  // namespace dsserve_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_moe", &dsserve_cpu::fused_moe, "routed experts of one MoE layer (packed weights)");
  m.def("fused_moe_int8", &dsserve_cpu::fused_moe_int8, "int8 W8A8 routed experts of one MoE layer");
  m.def("fused_moe_fp8", &dsserve_cpu::fused_moe_fp8, "FP8 weight-only routed experts of one MoE layer");
  m.def("fp8_linear", &dsserve_cpu::fp8_linear, "x W^T (+ b) with W kept e4m3, widened to bf16 in registers");
  m.def("packed_linear", &dsserve_cpu::packed_linear, "x W^T (+ b) on a packed weight");
  m.def("head_linear", &dsserve_cpu::head_linear, "per-head x W_h^T on per-head packed weights");
  m.def("int8_linear", &dsserve_cpu::int8_linear, "W8A8 x W^T (+ b): activations quantized in the call");
  m.def("route", &dsserve_cpu::route, "MoE routing of every token: scores, grouped top-k, weights");
  m.def("rms_norm", &dsserve_cpu::rms_norm, "RMSNorm of rows, the residual add fused (residual updated in place)");
  m.def("rotary", &dsserve_cpu::rotary, "rotary embedding of [tokens, heads, D] in place");
  m.def("mla_decode", &dsserve_cpu::mla_decode, "MLA decode on the paged latent cache, split over the KV length");
}
