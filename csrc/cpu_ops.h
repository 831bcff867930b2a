// Entry points of CPU kernels that other CPU kernels compose in C++ (the decoder layers at decode:
// opt_decode_block_cpu.cpp, t5_decode_block_cpu.cpp).
// Each is also registered as an op of its own (schemas in ops.cpp) and checks its arguments itself.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace blip2_fast {

// linear_cpu.cpp: act(x @ Wᵀ + bias), W packed by linear_pack_cpu; into `out`, or a new tensor.
void linear_cpu_out(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                    int64_t out_features, const std::string& activation, const std::string& isa, at::Tensor& out);
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                      int64_t out_features, const std::string& activation, const std::string& isa);

// For an op composing linear_cpu: `w` (argument `name` of op `op`) must be a float32 weight packed
// for K inputs (a bf16 packing would be taken too, and round x to bf16).
inline void check_packed_f32(const char* op, const at::Tensor& w, const char* name, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(1) == K, op, ": ", name,
              " must be a float32 weight packed by linear_pack_cpu, [blocks, K = ", K, ", 32], got ", w.scalar_type(),
              " ", w.sizes());
}

// paged_attention_cpu.cpp: one decode query per sequence over its paged cache -> [N, H, D].
at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                               const std::optional<at::Tensor>& rel_bias);

// write_kv_cpu.cpp: k, v [T, H, D] into the caches at slot_mapping (negative = skip).
void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping);

// rms_norm_cpu.cpp: (RMSNorm(x + residual) * weight, x + residual); without a residual the second is empty.
std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& residual, double eps);

}  // namespace blip2_fast
