// CUDA binding of blip2_fast::cross_attention_fwd: checks the tensors, fills CrossAttnParams and launches
// cross_attention.cu's kernel on the current stream (so it composes with CUDA graphs and streams).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ne.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cross_attention.h"

namespace blip2_fast {
namespace {

void copy_strides(const at::Tensor& t, int64_t (&dst)[4]) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

at::Tensor cross_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& key_padding_mask, std::optional<double> scale) {
  check_cross_attention_args(q, k, v, key_padding_mask, /*cuda=*/true);
  TORCH_CHECK(q.is_cuda(), "cross_attention: the CUDA kernel got q on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous [B, H, Nq, D]
  if (out.numel() == 0) return out;
  at::Tensor keep;
  if (key_padding_mask.has_value())
    keep = key_padding_mask->scalar_type() == at::kBool ? *key_padding_mask : key_padding_mask->ne(0);

  CrossAttnParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.mask = keep.defined() ? reinterpret_cast<const uint8_t*>(keep.const_data_ptr<bool>()) : nullptr;
  p.out = out.mutable_data_ptr();
  copy_strides(q, p.q_stride);
  copy_strides(k, p.k_stride);
  copy_strides(v, p.v_stride);
  p.mask_stride[0] = keep.defined() ? keep.stride(0) : 0;
  p.mask_stride[1] = keep.defined() ? keep.stride(1) : 0;
  p.B = q.size(0), p.H = q.size(1), p.Nq = q.size(2), p.Nk = k.size(2), p.D = q.size(3);
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.D)));
  p.dtype = q.scalar_type() == at::kFloat  ? CrossAttnDtype::kFloat32
            : q.scalar_type() == at::kHalf ? CrossAttnDtype::kFloat16
                                           : CrossAttnDtype::kBFloat16;
  const cudaError_t err = cross_attention_cuda_launch(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "cross_attention: CUDA kernel launch failed: ", cudaGetErrorString(err),
              " (q ", q.sizes(), ", k ", k.sizes(), ", ", q.scalar_type(), ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(blip2_fast, CUDA, m) { m.impl("cross_attention_fwd", &cross_attention_cuda); }

}  // namespace blip2_fast
