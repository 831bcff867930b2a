// Argument checks at the C++ door of blip2_fast::cross_attention_fwd, shared by the CPU and CUDA bindings.
// Every message names the argument and the shape it should have, so a caller can fix the call from
// the message alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

namespace blip2_fast {

// The CUDA kernel keeps a [D, 32] query tile and [64, D] key/value tiles in shared memory.
constexpr int64_t kCudaMaxHeadDim = 128;

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// q [B, H, Nq, D]; k, v [B, H, Nk, D]; key_padding_mask [B, Nk] (any dtype, nonzero = keep).
inline void check_cross_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& key_padding_mask, bool cuda) {
  TORCH_CHECK(q.dim() == 4, "cross_attention: q must have shape [B, H, Nq, D], got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "cross_attention: k must have shape [B, H, Nk, D] = [", B, ", ", H, ", Nk, ", D,
              "] (B, H, D from q ", q.sizes(), "), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.sizes() == k.sizes(),
              "cross_attention: v must have k's shape [B, H, Nk, D] = ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(is_supported_dtype(q.scalar_type()),
              "cross_attention: q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "cross_attention: k and v must have q's dtype ", q.scalar_type(), ", got k ", k.scalar_type(),
              " and v ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "cross_attention: k and v must be on q's device ", q.device(), ", got k on ", k.device(),
              " and v on ", v.device());
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == k.size(2),
                "cross_attention: key_padding_mask must have shape [B, Nk] = [", B, ", ", k.size(2), "], got ",
                m.sizes());
    TORCH_CHECK(m.device() == q.device(), "cross_attention: key_padding_mask must be on q's device ", q.device(),
                ", got ", m.device());
    TORCH_CHECK(!m.is_complex(), "cross_attention: key_padding_mask must be bool or real, got ", m.scalar_type());
  }
  if (cuda) {
    TORCH_CHECK(D <= kCudaMaxHeadDim, "cross_attention: the CUDA kernel supports head dim D <= ", kCudaMaxHeadDim,
                "; q has shape [B, H, Nq, D] = ", q.sizes());
  }
}

}  // namespace blip2_fast
