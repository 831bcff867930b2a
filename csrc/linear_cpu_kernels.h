// Micro-kernels of blip2_fast::linear_cpu (csrc/linear_cpu.cpp), one per ISA and weight dtype.
//
// Each computes a tile of at most MT rows x kNB = 32 output columns of x @ Wᵀ over a K chunk, reading
// one column block of the packed weight once:
//   fp32: w [kc][32]        the block's rows k0..k0+kc, 32 columns each (128 bytes per k)
//   bf16: w [kc2][32] u32   pairs (W[j, 2p], W[j, 2p+1]) packed in one uint32, low half = even k
// Each chunk sums its products from zero, then adds that sum into acc [MT][32] (fp32, row stride 32)
// when `accumulate`, else stores it: a two-level sum whose rounding error grows with kc + K / kc
// terms, not K (one running sum over K = 2560 errs 5x more than MKL's GEMM). Every product goes into
// its sum with one fp32 rounding (an FMA, or each of vdpbf16ps's two adds), so the usual fp32
// dot-product bound |error| <= K u sum |products| holds for any chunking.
//
// Functions carry their ISA in a target attribute (no -mavx512f for the whole build: the library must
// load on any x86-64); linear_cpu.cpp picks one at run time from cpuid. Off x86-64 only the scalar
// kernels are compiled.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define BLIP2_FAST_X86 1
#include <immintrin.h>
#else
#define BLIP2_FAST_X86 0
#endif

namespace blip2_fast {
namespace linear {

constexpr int64_t kNB = 32;  // output columns per packed block: 2 AVX-512 / 4 AVX2 registers of fp32

// Most rows one tile keeps in registers: AVX-512 has 32 zmm (2 x 12 accumulators + 2 weight rows +
// the broadcast), AVX2 16 ymm and runs a block as two 16-column halves (2 x 6 + 2 + 1; bf16 also
// widens each weight row into 4 registers, so 2 x 4 + 4 + 2).
constexpr int kMaxRowsAvx512 = 12;
constexpr int kMaxRowsAvx2 = 6;
constexpr int kMaxRowsAvx2Bf16 = 4;
constexpr int kMaxRowsScalar = 4;

// ---- portable fallback (also what non-x86 builds run): plain loops the compiler may vectorise ----

template <int MT>
void tile_f32_scalar(const void* xv, int64_t ldx, const void* wv, int64_t kc, float* acc, bool accumulate) {
  const float* x = static_cast<const float*>(xv);
  const float* w = static_cast<const float*>(wv);
  float c[MT][kNB];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kNB; ++j) c[m][j] = 0.0f;
  for (int64_t k = 0; k < kc; ++k)
    for (int m = 0; m < MT; ++m) {
      const float xv = x[m * ldx + k];
      for (int j = 0; j < kNB; ++j) c[m][j] += xv * w[k * kNB + j];
    }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kNB; ++j) acc[m * kNB + j] = accumulate ? acc[m * kNB + j] + c[m][j] : c[m][j];
}

inline float bf16_lo(uint32_t p) {  // the even-k element of a pair, widened exactly
  const uint32_t b = p << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline float bf16_hi(uint32_t p) {
  const uint32_t b = p & 0xffff0000u;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// xr: x rounded to bf16 and widened back, [MT][2 * kc2] with row stride ldx
template <int MT>
void tile_bf16_scalar(const void* xv, int64_t ldx, const void* wv, int64_t kc2, float* acc, bool accumulate) {
  const float* xr = static_cast<const float*>(xv);
  const uint32_t* w = static_cast<const uint32_t*>(wv);
  float c[MT][kNB];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kNB; ++j) c[m][j] = 0.0f;
  for (int64_t p = 0; p < kc2; ++p)
    for (int m = 0; m < MT; ++m) {
      const float xe = xr[m * ldx + 2 * p], xo = xr[m * ldx + 2 * p + 1];
      for (int j = 0; j < kNB; ++j) {
        c[m][j] += xe * bf16_lo(w[p * kNB + j]);
        c[m][j] += xo * bf16_hi(w[p * kNB + j]);
      }
    }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < kNB; ++j) acc[m * kNB + j] = accumulate ? acc[m * kNB + j] + c[m][j] : c[m][j];
}

#if BLIP2_FAST_X86

// Each tile is its own (non-inlined) function, reached through a table indexed by MT: a call per
// tile and K chunk costs nothing next to the chunk's loads, and keeps the driver ISA-agnostic.
#define BLIP2_FAST_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define BLIP2_FAST_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx512bf16")))
#define BLIP2_FAST_AVX2 __attribute__((target("avx2,fma")))


// Software prefetch for a weight streamed once (a decode step: at most 32 rows). With 8 or more rows
// the AVX-512 FMAs keep the core busy, its out-of-order window covers only a KB or two of the stream,
// and the hardware prefetch falls behind: asking for the bytes this far ahead cut an fp32 [8, 512] x
// 1536 linear with its weight cold from 0.27 to 0.19 ms here (Zen 4, 1 thread), the bf16 head [8, 512]
// x 50304 by 15-25%. With 1 - 4 rows the hardware keeps up there and the prefetches only cost (8 KB
// ahead: 20% slower at 1 row), so those AVX-512 tiles issue none. The AVX2 tiles run each block as
// two 16-column halves, each reading every other line: a stride the hardware follows poorly at any
// row count, so every AVX2 tile prefetches (run on the same Zen 4 with the ISA capped: 1.3-2x faster
// at 1-32 rows, fp32 [1, 512] x 1536 0.30 -> 0.19 ms). 256 B - 1 KB ahead gained nothing (too near).
constexpr int kStreamPrefetchF32 = 8192, kStreamPrefetchBf16 = 4096;
constexpr int kStreamMinRowsAvx2 = 1;

BLIP2_FAST_INLINE void prefetch_line(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
BLIP2_FAST_INLINE void prefetch_2lines(const void* p) {
  prefetch_line(p);
  prefetch_line(static_cast<const char*>(p) + 64);
}

// ---- AVX-512 fp32: 32 columns x MT rows, two zmm accumulators per row ----
template <int MT, bool STREAM = false>
BLIP2_FAST_AVX512 void tile_f32_avx512(const void* xv, int64_t ldx, const void* wv, int64_t kc, float* acc, bool accumulate) {
  const float* x = static_cast<const float*>(xv);
  const float* w = static_cast<const float*>(wv);
  __m512 c0[MT], c1[MT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    c0[m] = _mm512_setzero_ps();
    c1[m] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const float* wk = w + k * kNB;
    if constexpr (STREAM && MT >= 8) prefetch_2lines(reinterpret_cast<const char*>(wk) + kStreamPrefetchF32);
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      c0[m] = _mm512_fmadd_ps(xb, w0, c0[m]);
      c1[m] = _mm512_fmadd_ps(xb, w1, c1[m]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    if (accumulate) {
      c0[m] = _mm512_add_ps(_mm512_loadu_ps(acc + m * kNB), c0[m]);
      c1[m] = _mm512_add_ps(_mm512_loadu_ps(acc + m * kNB + 16), c1[m]);
    }
    _mm512_storeu_ps(acc + m * kNB, c0[m]);
    _mm512_storeu_ps(acc + m * kNB + 16, c1[m]);
  }
}

// ---- AVX-512 bf16, native (vdpbf16ps: a pair of bf16 products per fp32 lane) ----
template <int MT, bool STREAM = false>
BLIP2_FAST_AVX512BF16 void tile_bf16_avx512bf16(const void* xv, int64_t ldx, const void* wv, int64_t kc2, float* acc, bool accumulate) {
  const uint32_t* xp = static_cast<const uint32_t*>(xv);
  const uint32_t* w = static_cast<const uint32_t*>(wv);
  __m512 c0[MT], c1[MT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    c0[m] = _mm512_setzero_ps();
    c1[m] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kc2; ++p) {
    const uint32_t* wp = w + p * kNB;
    if constexpr (STREAM && MT >= 8) prefetch_2lines(reinterpret_cast<const char*>(wp) + kStreamPrefetchBf16);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 16);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[m * ldx + p]));
      c0[m] = _mm512_dpbf16_ps(c0[m], w0, xb);
      c1[m] = _mm512_dpbf16_ps(c1[m], w1, xb);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    if (accumulate) {
      c0[m] = _mm512_add_ps(_mm512_loadu_ps(acc + m * kNB), c0[m]);
      c1[m] = _mm512_add_ps(_mm512_loadu_ps(acc + m * kNB + 16), c1[m]);
    }
    _mm512_storeu_ps(acc + m * kNB, c0[m]);
    _mm512_storeu_ps(acc + m * kNB + 16, c1[m]);
  }
}

// ---- AVX-512 bf16 without vdpbf16ps: widen each pair to two fp32 weights (a shift, a mask) ----
template <int MT>
BLIP2_FAST_AVX512 void tile_bf16_avx512(const void* xv, int64_t ldx, const void* wv, int64_t kc2, float* acc, bool accumulate) {
  const float* xr = static_cast<const float*>(xv);
  const uint32_t* w = static_cast<const uint32_t*>(wv);
  __m512 c0[MT], c1[MT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    c0[m] = _mm512_setzero_ps();
    c1[m] = _mm512_setzero_ps();
  }
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t p = 0; p < kc2; ++p) {
    const uint32_t* wp = w + p * kNB;
    const __m512i p0 = _mm512_loadu_si512(wp), p1 = _mm512_loadu_si512(wp + 16);
    const __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(p0, 16)), o0 = _mm512_castsi512_ps(_mm512_and_si512(p0, hi));
    const __m512 e1 = _mm512_castsi512_ps(_mm512_slli_epi32(p1, 16)), o1 = _mm512_castsi512_ps(_mm512_and_si512(p1, hi));
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512 xe = _mm512_set1_ps(xr[m * ldx + 2 * p]), xo = _mm512_set1_ps(xr[m * ldx + 2 * p + 1]);
      c0[m] = _mm512_fmadd_ps(xo, o0, _mm512_fmadd_ps(xe, e0, c0[m]));
      c1[m] = _mm512_fmadd_ps(xo, o1, _mm512_fmadd_ps(xe, e1, c1[m]));
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    if (accumulate) {
      c0[m] = _mm512_add_ps(_mm512_loadu_ps(acc + m * kNB), c0[m]);
      c1[m] = _mm512_add_ps(_mm512_loadu_ps(acc + m * kNB + 16), c1[m]);
    }
    _mm512_storeu_ps(acc + m * kNB, c0[m]);
    _mm512_storeu_ps(acc + m * kNB + 16, c1[m]);
  }
}

// ---- AVX2 fp32: one 16-column half of a block (w and acc point at the half), MT rows ----
template <int MT, bool STREAM = false>
BLIP2_FAST_AVX2 void tile_f32_avx2(const void* xv, int64_t ldx, const void* wv, int64_t kc, float* acc, bool accumulate) {
  const float* x = static_cast<const float*>(xv);
  const float* w = static_cast<const float*>(wv);
  __m256 c0[MT], c1[MT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    c0[m] = _mm256_setzero_ps();
    c1[m] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const float* wk = w + k * kNB;
    if constexpr (STREAM && MT >= kStreamMinRowsAvx2)  // this half reads one of each k's two lines
      prefetch_line(reinterpret_cast<const char*>(wk) + kStreamPrefetchF32);
    const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
      c0[m] = _mm256_fmadd_ps(xb, w0, c0[m]);
      c1[m] = _mm256_fmadd_ps(xb, w1, c1[m]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    if (accumulate) {
      c0[m] = _mm256_add_ps(_mm256_loadu_ps(acc + m * kNB), c0[m]);
      c1[m] = _mm256_add_ps(_mm256_loadu_ps(acc + m * kNB + 8), c1[m]);
    }
    _mm256_storeu_ps(acc + m * kNB, c0[m]);
    _mm256_storeu_ps(acc + m * kNB + 8, c1[m]);
  }
}

// ---- AVX2 bf16 (no native instruction): a 16-column half, pairs widened as in tile_bf16_avx512 ----
template <int MT, bool STREAM = false>
BLIP2_FAST_AVX2 void tile_bf16_avx2(const void* xv, int64_t ldx, const void* wv, int64_t kc2, float* acc, bool accumulate) {
  const float* xr = static_cast<const float*>(xv);
  const uint32_t* w = static_cast<const uint32_t*>(wv);
  __m256 c0[MT], c1[MT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    c0[m] = _mm256_setzero_ps();
    c1[m] = _mm256_setzero_ps();
  }
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t p = 0; p < kc2; ++p) {
    const uint32_t* wp = w + p * kNB;
    if constexpr (STREAM && MT >= kStreamMinRowsAvx2) prefetch_line(reinterpret_cast<const char*>(wp) + kStreamPrefetchBf16);
    const __m256i p0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
    const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 8));
    const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(p0, 16)), o0 = _mm256_castsi256_ps(_mm256_and_si256(p0, hi));
    const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(p1, 16)), o1 = _mm256_castsi256_ps(_mm256_and_si256(p1, hi));
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m256 xe = _mm256_broadcast_ss(xr + m * ldx + 2 * p), xo = _mm256_broadcast_ss(xr + m * ldx + 2 * p + 1);
      c0[m] = _mm256_fmadd_ps(xo, o0, _mm256_fmadd_ps(xe, e0, c0[m]));
      c1[m] = _mm256_fmadd_ps(xo, o1, _mm256_fmadd_ps(xe, e1, c1[m]));
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    if (accumulate) {
      c0[m] = _mm256_add_ps(_mm256_loadu_ps(acc + m * kNB), c0[m]);
      c1[m] = _mm256_add_ps(_mm256_loadu_ps(acc + m * kNB + 8), c1[m]);
    }
    _mm256_storeu_ps(acc + m * kNB, c0[m]);
    _mm256_storeu_ps(acc + m * kNB + 8, c1[m]);
  }
}

#endif  // BLIP2_FAST_X86

// tiles[MT] computes an MT-row tile (entry 0 unused)
using TileFn = void (*)(const void* x, int64_t ldx, const void* w, int64_t kc, float* acc, bool accumulate);
#define BLIP2_FAST_TILES4(f) {nullptr, &f<1>, &f<2>, &f<3>, &f<4>}
#define BLIP2_FAST_TILES4_STREAM(f) {nullptr, &f<1, true>, &f<2, true>, &f<3, true>, &f<4, true>}
#define BLIP2_FAST_TILES6(f) {nullptr, &f<1>, &f<2>, &f<3>, &f<4>, &f<5>, &f<6>}
#define BLIP2_FAST_TILES6_STREAM(f) {nullptr, &f<1, true>, &f<2, true>, &f<3, true>, &f<4, true>, &f<5, true>, &f<6, true>}
#define BLIP2_FAST_TILES12(f) \
  {nullptr, &f<1>, &f<2>, &f<3>, &f<4>, &f<5>, &f<6>, &f<7>, &f<8>, &f<9>, &f<10>, &f<11>, &f<12>}
// the same tiles with STREAM set: for a weight streamed once, prefetched as the comment above the tiles says
#define BLIP2_FAST_TILES12_STREAM(f)                                                                      \
  {nullptr,        &f<1, true>, &f<2, true>, &f<3, true>,   &f<4, true>,   &f<5, true>, &f<6, true>, \
   &f<7, true>,    &f<8, true>, &f<9, true>, &f<10, true>, &f<11, true>, &f<12, true>}

}  // namespace linear
}  // namespace blip2_fast
