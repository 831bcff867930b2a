// 16-float vectors in GCC's vector extension, shared by the CPU kernels. Each target clone
// (BLIP2_FAST_CLONES) lowers them to its own ISA: one zmm on AVX-512, two ymm on AVX2, four xmm on
// the baseline; plain per-lane loops would stay scalar where the compiler may not reorder (no
// -ffast-math), and libm's scalar functions (std::exp, std::erf) never vectorise.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_common.h"

namespace blip2_fast {
namespace vec {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

BLIP2_FAST_INLINE v16 load16(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
BLIP2_FAST_INLINE void store16(float* p, const v16& x) { std::memcpy(p, &x, sizeof(x)); }

// 16 values of any float type as fp32 (fp16 / bf16 converted lane by lane, which vectorises).
template <typename T>
BLIP2_FAST_INLINE v16 load16_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load16(p);
  } else {
    v16 x;
    for (int e = 0; e < 16; ++e) x[e] = static_cast<float>(p[e]);
    return x;
  }
}

template <int N>
BLIP2_FAST_INLINE v16 horner(const v16& t, const float (&c)[N]) {
  v16 r = v16{} + c[N - 1];
  for (int i = N - 2; i >= 0; --i) r = r * t + c[i];
  return r;
}

// exp over 16 lanes, relative error below 2^-22 on [-87, 88] (softmax numerators: the inputs are
// scores minus their max, <= 0). x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2 is
// exact), e^r by a degree-7 polynomial (Cephes' coefficients), 2^n built in the exponent
// bits. Inputs are clamped to [-87, 88]: below -87 the result is e^-87 (1.6e-38, a normal float; a
// softmax weight that small is nothing next to its max, 1); NaN stays NaN.
BLIP2_FAST_INLINE v16 exp16(const v16& in) {
  static constexpr float kP[] = {1.0f, 1.0f, 5.0000001201e-1f, 1.6666665459e-1f, 4.1665795894e-2f, 8.3334519073e-3f,
                                 1.3981999507e-3f, 1.9875691500e-4f};
  const v16 x = in < -87.0f ? v16{} - 87.0f : in > 88.0f ? v16{} + 88.0f : in;  // NaN compares false: kept
  const v16 t = x * 1.44269504088896341f + 0.5f;
  v16 n = __builtin_convertvector(__builtin_convertvector(t, vi16), v16);  // truncation toward zero
  n = n > t ? n - 1.0f : n;                                                 // floor(x log2 e + 1/2)
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;               // x - n ln2, in two parts
  const v16 p = horner(r, kP);
  const vi16 scale = (__builtin_convertvector(n, vi16) + 127) << 23;       // 2^n, n in [-126, 127]
  return p * (v16)scale;
}

}  // namespace vec
}  // namespace blip2_fast
