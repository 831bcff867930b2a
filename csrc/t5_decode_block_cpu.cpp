// CPU kernel of blip2_fast::t5_decode_block_cpu (schema in ops.cpp, spec: reference.t5_decode_block_ref).
//
// One T5 decoder layer for a decode step (one new token per sequence), composed in C++ of the kernels
// the layer's Python forward calls, in the same order and with the same arguments: RMSNorm with the
// previous layer's output added to the residual stream (rms_norm_cpu), the packed qkv linear,
// write_kv, paged attention with the relative-position bias, the out projection; RMSNorm + residual,
// the cross-attention query, paged attention over the cached encoder K/V, its out projection;
// RMSNorm + residual and the feed-forward (gated or not; ReLU or erf GELU fused into the linear,
// Flan-T5's tanh GELU as torch's own pass, as the Python layer runs it). Like opt_decode_block_cpu.cpp
// it takes away the Python between the kernels, not any arithmetic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/gelu.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "cpu_ops.h"

namespace blip2_fast {
namespace {

// T5's linears have no bias
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t n_out, const std::string& act,
                  const std::string& isa) {
  return linear_cpu(x, w, std::nullopt, n_out, act, isa);
}

std::tuple<at::Tensor, at::Tensor> t5_decode_block_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& delta, const at::Tensor& ln_sa, const at::Tensor& qkv,
    const at::Tensor& o, const at::Tensor& ln_ca, const at::Tensor& q, const at::Tensor& o_cross,
    const at::Tensor& ln_ff, const at::Tensor& wi0, const std::optional<at::Tensor>& wi1, const at::Tensor& wo,
    at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, const at::Tensor& rel_bias, const at::Tensor& cross_k, const at::Tensor& cross_v,
    const at::Tensor& cross_block_tables, const at::Tensor& cross_seq_lens, int64_t heads, int64_t d_kv,
    int64_t d_ff, double eps, const std::string& activation, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous(),
              "t5_decode_block: x must be a contiguous float32 CPU tensor [N, d_model], got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(!delta.has_value() || delta->sizes() == x.sizes(), "t5_decode_block: delta must have x's shape ",
              x.sizes(), " or be None, got ", delta.has_value() ? delta->sizes() : x.sizes());
  TORCH_CHECK(activation == "relu" || activation == "gelu" || activation == "gelu_tanh",
              "t5_decode_block: activation must be \"relu\", \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
  TORCH_CHECK(heads >= 1 && d_kv >= 1 && d_ff >= 1, "t5_decode_block: heads, d_kv and d_ff must be positive, got ",
              heads, ", ", d_kv, ", ", d_ff);
  const int64_t N = x.size(0), D = x.size(1), inner = heads * d_kv;
  constexpr const char* op = "t5_decode_block";
  check_packed_f32(op, qkv, "qkv", D), check_packed_f32(op, o, "o", inner), check_packed_f32(op, q, "q", D);
  check_packed_f32(op, o_cross, "o_cross", inner), check_packed_f32(op, wi0, "wi0", D);
  check_packed_f32(op, wo, "wo", d_ff);
  if (wi1.has_value()) check_packed_f32(op, *wi1, "wi1", D);

  // self-attention: the residual stream takes the previous layer's output first
  at::Tensor h, s;
  if (delta.has_value()) {
    std::tie(h, s) = rms_norm_cpu(*delta, ln_sa, x, eps);
  } else {
    h = std::get<0>(rms_norm_cpu(x, ln_sa, std::nullopt, eps));
    s = x;
  }
  at::Tensor t = linear(h, qkv, 3 * inner, "none", isa).view({N, 3, heads, d_kv});  // q, k, v: [N, H, d_kv] views
  write_kv_cpu(t.select(1, 1), t.select(1, 2), k_cache, v_cache, slot_mapping);
  at::Tensor a = paged_attention_cpu(t.select(1, 0), k_cache, v_cache, block_tables, seq_lens, 1.0, rel_bias);
  at::Tensor d = linear(a.view({N, inner}), o, D, "none", isa);
  // cross-attention over the encoder's cached K/V
  std::tie(h, s) = rms_norm_cpu(d, ln_ca, s, eps);
  const at::Tensor qc = linear(h, q, inner, "none", isa).view({N, heads, d_kv});
  a = paged_attention_cpu(qc, cross_k, cross_v, cross_block_tables, cross_seq_lens, 1.0, std::nullopt);
  d = linear(a.view({N, inner}), o_cross, D, "none", isa);
  // feed-forward
  std::tie(h, s) = rms_norm_cpu(d, ln_ff, s, eps);
  const bool tanh = activation == "gelu_tanh";
  at::Tensor g = linear(h, wi0, d_ff, tanh ? "none" : activation, isa);
  if (tanh) g = at::gelu(g, "tanh");
  if (wi1.has_value()) g.mul_(linear(h, *wi1, d_ff, "none", isa));
  return {linear(g, wo, D, "none", isa), s};
}

}  // namespace

TORCH_LIBRARY_IMPL(blip2_fast, CPU, m) { m.impl("t5_decode_block_cpu", &t5_decode_block_cpu); }

}  // namespace blip2_fast
