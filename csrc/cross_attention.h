// Host launcher of the CUDA cross-attention kernel (cross_attention.cu), in plain C++ and CUDA runtime
// types: the .cu needs no ATen header and compiles with a bare `nvcc -c`; cross_attention_cuda.cpp
// turns tensors into CrossAttnParams.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace blip2_fast {

enum class CrossAttnDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct CrossAttnParams {
  const void* q;         // [B, H, Nq, D] in `dtype`, element strides q_stride
  const void* k;         // [B, H, Nk, D], strides k_stride
  const void* v;         // [B, H, Nk, D], strides v_stride
  const uint8_t* mask;   // [B, Nk] bools (1 = keep), strides mask_stride; nullptr = keep every key
  void* out;             // [B, H, Nq, D], contiguous
  int64_t q_stride[4];
  int64_t k_stride[4];
  int64_t v_stride[4];
  int64_t mask_stride[2];
  int64_t B, H, Nq, Nk, D;  // D <= 128 (checks.h: kCudaMaxHeadDim)
  float scale;           // multiplies q kᵀ before the softmax
  CrossAttnDtype dtype;  // of q, k, v and out
};

// Enqueues the kernel on `stream`. Returns cudaSuccess, cudaErrorInvalidValue for D > 128 or an
// unknown dtype, or the launch's error; enqueues nothing for an empty output. Does not synchronise.
cudaError_t cross_attention_cuda_launch(const CrossAttnParams& p, cudaStream_t stream);

}  // namespace blip2_fast
