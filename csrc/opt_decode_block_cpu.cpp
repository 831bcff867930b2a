// CPU kernel of blip2_fast::opt_decode_block_cpu (schema in ops.cpp, spec: reference.opt_decode_block_ref).
//
// One pre-LayerNorm OPT decoder layer for a decode step (one new token per sequence), composed in
// C++ of the kernels the layer's Python forward calls, in the same order and with the same
// arguments: LayerNorm (torch's), the packed qkv linear, write_kv, paged attention, the packed out
// projection, the residual add, LayerNorm, fc1 with its activation fused, fc2, the residual add. The
// arithmetic is theirs; what goes is the Python between them: about fifteen calls per layer (module
// calls, wrappers, views, the dispatcher from Python), ~70 us per layer of blip2-cpu-mid at batch 8
// on one core (8.06 -> 7.62 ms a step, in-process A/B).
#include <ATen/core/Tensor.h>
#include <ATen/ops/layer_norm.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

#include "cpu_ops.h"

namespace blip2_fast {
namespace {

void check_norm(const std::optional<at::Tensor>& t, const char* name, int64_t E) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == E && t->scalar_type() == at::kFloat && t->device().is_cpu(),
              "opt_decode_block: ", name, " must be a float32 CPU tensor [E = ", E, "] or None, got ", t->scalar_type(),
              " ", t->sizes());
}

at::Tensor opt_decode_block_cpu(const at::Tensor& x, const std::optional<at::Tensor>& ln1_weight,
                                const std::optional<at::Tensor>& ln1_bias, const at::Tensor& qkv,
                                const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_proj,
                                const std::optional<at::Tensor>& out_bias, const std::optional<at::Tensor>& ln2_weight,
                                const std::optional<at::Tensor>& ln2_bias, const at::Tensor& fc1,
                                const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2,
                                const std::optional<at::Tensor>& fc2_bias, at::Tensor& k_cache, at::Tensor& v_cache,
                                const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, int64_t heads, int64_t ffn, double eps,
                                const std::string& activation, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous(),
              "opt_decode_block: x must be a contiguous float32 CPU tensor [N, E], got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  const int64_t N = x.size(0), E = x.size(1);
  TORCH_CHECK(heads >= 1 && E % heads == 0, "opt_decode_block: heads = ", heads, " must divide E = ", E);
  TORCH_CHECK(ffn >= 1, "opt_decode_block: ffn must be positive, got ", ffn);
  check_norm(ln1_weight, "ln1_weight", E), check_norm(ln1_bias, "ln1_bias", E);
  check_norm(ln2_weight, "ln2_weight", E), check_norm(ln2_bias, "ln2_bias", E);
  constexpr const char* op = "opt_decode_block";
  check_packed_f32(op, qkv, "qkv", E), check_packed_f32(op, out_proj, "out_proj", E);
  check_packed_f32(op, fc1, "fc1", E), check_packed_f32(op, fc2, "fc2", ffn);
  const int64_t D = E / heads;

  const at::Tensor h = at::layer_norm(x, {E}, ln1_weight, ln1_bias, eps, false);
  // [N, 3E] -> q (pre-scaled), k, v, each [N, H, D] (strided views)
  const at::Tensor t = linear_cpu(h, qkv, qkv_bias, 3 * E, "none", isa).view({N, 3, heads, D});
  write_kv_cpu(t.select(1, 1), t.select(1, 2), k_cache, v_cache, slot_mapping);
  const at::Tensor a = paged_attention_cpu(t.select(1, 0), k_cache, v_cache, block_tables, seq_lens, 1.0,
                                           std::nullopt);  // [N, H, D], contiguous
  at::Tensor x1 = linear_cpu(a.view({N, E}), out_proj, out_bias, E, "none", isa);
  x1.add_(x);  // the residual stream after attention
  const at::Tensor h2 = at::layer_norm(x1, {E}, ln2_weight, ln2_bias, eps, false);
  at::Tensor y = linear_cpu(linear_cpu(h2, fc1, fc1_bias, ffn, activation, isa), fc2, fc2_bias, E, "none", isa);
  y.add_(x1);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(blip2_fast, CPU, m) { m.impl("opt_decode_block_cpu", &opt_decode_block_cpu); }

}  // namespace blip2_fast
