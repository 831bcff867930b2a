// CPU kernel of blip2_fast::rms_norm_cpu_fwd (schema in ops.cpp, spec: reference.rms_norm_ref).
//
// T5's RMSNorm, with the residual add fused: s = x + residual (rounded to x's dtype, as eager adds),
// y = weight * round_to_weight_dtype(s / sqrt(mean(s²) + eps)), in x's dtype, statistics in fp32.
// The reference is eight torch ops per call (add, pow, mean, add, rsqrt, mul, two casts), each a pass
// over the row and ~3-7 us of dispatch at a decode step's few rows: 19 calls made ~0.45 ms of a
// Flan-T5 decode step on the CPU. Here it is one pass to sum the squares and one to scale. Rows are
// spread over torch's threads only when there are enough of them to pay for the parallel region.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu_common.h"
#include "cpu_ops.h"
#include "cpu_vec.h"

namespace blip2_fast {
namespace {

struct RmsArgs {
  const void* x;
  const void* residual;  // nullptr: none
  const void* weight;
  void* y;
  void* s;  // x + residual, or nullptr
  int64_t rows, n;
  float eps;
};

template <typename T>
BLIP2_FAST_INLINE float f32(T v) {
  return static_cast<float>(v);
}

// One row. X: x / residual / y / s dtype; W: the weight's. The sum of squares runs in 16 fp32
// lanes (torch's mean sums in another order: the two differ by rounding only).
template <typename X, typename W>
BLIP2_FAST_INLINE void rms_row(const X* x, const X* r, const W* w, X* y, X* s, int64_t n, float eps) {
  const X* src = x;
  if (r != nullptr) {  // the sum is rounded to X first: the next block's residual is this very tensor
    for (int64_t i = 0; i < n; ++i) s[i] = static_cast<X>(f32(x[i]) + f32(r[i]));
    src = s;
  }
  vec::v16 lanes{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vec::v16 v = vec::load16_f32(src + i);
    lanes += v * v;
  }
  float sum = 0.0f;
  for (; i < n; ++i) sum += f32(src[i]) * f32(src[i]);
  for (int e = 0; e < 16; ++e) sum += lanes[e];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t j = 0; j < n; ++j)  // T5 rounds the normalised row to the weight's dtype before scaling
    y[j] = static_cast<X>(f32(w[j]) * f32(static_cast<W>(f32(src[j]) * inv)));
}

template <typename X, typename W>
BLIP2_FAST_INLINE void run_rows(const RmsArgs& A, int64_t begin, int64_t end) {
  const X* x = static_cast<const X*>(A.x);
  const X* r = static_cast<const X*>(A.residual);
  const W* w = static_cast<const W*>(A.weight);
  X* y = static_cast<X*>(A.y);
  X* s = static_cast<X*>(A.s);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t o = row * A.n;
    rms_row<X, W>(x + o, r != nullptr ? r + o : nullptr, w, y + o, s != nullptr ? s + o : nullptr, A.n, A.eps);
  }
}

using RunFn = void (*)(const RmsArgs&, int64_t, int64_t);

#define BLIP2_FAST_RMS_CLONE(NAME, X, W) \
  BLIP2_FAST_CLONES void NAME(const RmsArgs& A, int64_t b, int64_t e) { run_rows<X, W>(A, b, e); }
BLIP2_FAST_RMS_CLONE(rms_f32_f32, float, float)
BLIP2_FAST_RMS_CLONE(rms_f32_f16, float, c10::Half)
BLIP2_FAST_RMS_CLONE(rms_f32_bf16, float, c10::BFloat16)
BLIP2_FAST_RMS_CLONE(rms_f16_f32, c10::Half, float)
BLIP2_FAST_RMS_CLONE(rms_f16_f16, c10::Half, c10::Half)
BLIP2_FAST_RMS_CLONE(rms_f16_bf16, c10::Half, c10::BFloat16)
BLIP2_FAST_RMS_CLONE(rms_bf16_f32, c10::BFloat16, float)
BLIP2_FAST_RMS_CLONE(rms_bf16_f16, c10::BFloat16, c10::Half)
BLIP2_FAST_RMS_CLONE(rms_bf16_bf16, c10::BFloat16, c10::BFloat16)
#undef BLIP2_FAST_RMS_CLONE

RunFn pick(at::ScalarType x, at::ScalarType w) {
  const int xi = x == at::kFloat ? 0 : x == at::kHalf ? 1 : 2;
  const int wi = w == at::kFloat ? 0 : w == at::kHalf ? 1 : 2;
  static constexpr RunFn table[3][3] = {{rms_f32_f32, rms_f32_f16, rms_f32_bf16},
                                        {rms_f16_f32, rms_f16_f16, rms_f16_bf16},
                                        {rms_bf16_f32, rms_bf16_f16, rms_bf16_bf16}};
  return table[xi][wi];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& residual, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "rms_norm: x must have shape [..., N] with N >= 1, got ", x.sizes());
  const int64_t n = x.size(-1);
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), "rms_norm: x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "rms_norm: weight must have shape [N] = [", n, "], got ",
              weight.sizes());
  TORCH_CHECK(is_supported_dtype(weight.scalar_type()), "rms_norm: weight must be float32, float16 or bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: the CPU kernel got x on ", x.device(),
              " and weight on ", weight.device());
  TORCH_CHECK(eps >= 0.0, "rms_norm: eps must be a non-negative float, got ", eps);
  at::Tensor r;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "rms_norm: residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device().is_cpu(),
                "rms_norm: residual must be x's dtype ", x.scalar_type(), " on the CPU, got ", residual->scalar_type(),
                " on ", residual->device());
    r = residual->contiguous();
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor s = r.defined() ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  RmsArgs A{};
  A.x = xc.const_data_ptr(), A.weight = wc.const_data_ptr(), A.y = y.mutable_data_ptr();
  A.residual = r.defined() ? r.const_data_ptr() : nullptr;
  A.s = r.defined() ? s.mutable_data_ptr() : nullptr;
  A.n = n, A.rows = xc.numel() / n, A.eps = static_cast<float>(eps);  // n >= 1 (checked)
  if (A.rows == 0) return {y, s};
  const RunFn run = pick(x.scalar_type(), weight.scalar_type());
  // a parallel region costs more than a decode step's few rows: only ~32k elements or more are split
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, A.rows, grain, [&](int64_t begin, int64_t end) { run(A, begin, end); });
  return {y, s};
}

TORCH_LIBRARY_IMPL(blip2_fast, CPU, m) { m.impl("rms_norm_cpu_fwd", &rms_norm_cpu); }

}  // namespace blip2_fast
