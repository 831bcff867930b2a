// CPU kernel of blip2_fast::cross_attention_fwd (schema in ops.cpp, spec: reference.cross_attention_ref).
//
// Work item = (batch, head, block of queries), spread over threads with at::parallel_for. Keys come in
// tiles of kKB = 64: each tile is brought to fp32 once per work item, K transposed so that the scores
// of 4 queries x 64 keys accumulate as outer products in 16 vector registers (no horizontal sums);
// an online softmax (running max and sum, log2 domain) folds the tile into an fp32 numerator. q, k, v
// are read through their strides (fp32 rows in place), never made contiguous.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ne.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_common.h"

namespace blip2_fast {
namespace {

constexpr int64_t kKB = 64;  // keys per tile: an fp32 score row is 4 AVX-512 / 8 AVX2 registers
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16 floats: one AVX-512 register, two AVX2 ones, four SSE ones. GCC/Clang vector extensions rather
// than float arrays: GCC kept array accumulators on the stack, serialised by store forwarding.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));
constexpr int kKV = kKB / 16;  // v16 per score row

BLIP2_FAST_INLINE v16 splat(float x) { return v16{} + x; }
BLIP2_FAST_INLINE v16 load16(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
BLIP2_FAST_INLINE void store16(float* p, const v16& x) { std::memcpy(p, &x, sizeof(x)); }
BLIP2_FAST_INLINE v16 max16(const v16& a, const v16& b) { return a > b ? a : b; }
BLIP2_FAST_INLINE float hmax(const v16& x) {
  float r = x[0];
  for (int e = 1; e < 16; ++e) r = x[e] > r ? x[e] : r;
  return r;
}
BLIP2_FAST_INLINE float hsum(const v16& x) {
  float r = 0.0f;
  for (int e = 0; e < 16; ++e) r += x[e];
  return r;
}

// 2^x for x <= 0, x = -inf included (-> 0); glibc's exp2f does not vectorise without -ffast-math.
// Below -127 the result is flushed to 0: the exponent field n + 127 = 0 makes the scale +0.0.
BLIP2_FAST_INLINE v16 exp2_nonpos(const v16& x) {
  const v16 xc = max16(x, splat(-127.0f));
  const v16 n = (xc - 12582912.0f) + 12582912.0f;  // round to nearest (1.5 * 2^23 trick), exact
  const v16 r = xc - n;                              // [-0.5, 0.5]
  // Taylor series of e^(r ln2) to degree 7: relative error < 1e-8 on [-0.5, 0.5].
  v16 p = splat(1.5252733804059841e-05f);
  p = p * r + 1.5403530393381606e-04f;
  p = p * r + 1.3333558146428443e-03f;
  p = p * r + 9.6181291076284772e-03f;
  p = p * r + 5.5504108664821580e-02f;
  p = p * r + 2.4022650695910071e-01f;
  p = p * r + 6.9314718055994531e-01f;
  p = p * r + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;  // 2^n for n in [-126, 0], 0 for -127
  return p * (v16)bits;  // a vector cast reinterprets the bits
}

// Folds one key tile into the running state of QG queries, register-blocked: the QG score rows share
// each key-row load, and the QG x 16 output accumulators stay in registers over the tile's keys.
//   q:    [QG, D] queries, fp32, pre-multiplied by scale * log2(e)
//   kt:   [D, kKB] the key tile transposed; columns >= kn are zero
//   v:    [kn, D] the value tile, row stride ldv
//   bias: [kKB] 0 for a visible key, -inf for a masked key or a column >= kn
//   m, l: [QG] running max score (log2 domain) and running sum of 2^(score - m)
//   o:    [QG, D] running numerator sum_j 2^(s_j - m) v_j
template <int QG>
BLIP2_FAST_INLINE void attend_group(const float* __restrict__ q, const float* __restrict__ kt,
                                    const float* __restrict__ v, int64_t ldv, const float* __restrict__ bias,
                                    int64_t kn, int64_t D, float* __restrict__ m, float* __restrict__ l,
                                    float* __restrict__ o) {
  v16 sv[QG][kKV];
  for (int a = 0; a < QG; ++a)
    for (int c = 0; c < kKV; ++c) sv[a][c] = load16(bias + 16 * c);
  for (int64_t d = 0; d < D; ++d) {
    v16 kr[kKV];
    for (int c = 0; c < kKV; ++c) kr[c] = load16(kt + d * kKB + 16 * c);
    for (int a = 0; a < QG; ++a) {
      const float qd = q[a * D + d];
      for (int c = 0; c < kKV; ++c) sv[a][c] += qd * kr[c];
    }
  }
  alignas(64) float p[QG][kKB];  // probabilities, read back one by one below
  float alpha[QG];
  for (int a = 0; a < QG; ++a) {
    v16 mv = sv[a][0];
    for (int c = 1; c < kKV; ++c) mv = max16(mv, sv[a][c]);
    const float mx = hmax(mv);
    const float m_new = m[a] > mx ? m[a] : mx;
    if (m_new == kNegInf) {  // no visible key yet: every probability is 0 and the state stays
      alpha[a] = 1.0f;
      for (int c = 0; c < kKV; ++c) store16(p[a] + 16 * c, splat(0.0f));
      continue;
    }
    alpha[a] = exp2_nonpos(splat(m[a] - m_new))[0];
    v16 sum = splat(0.0f);
    for (int c = 0; c < kKV; ++c) {
      const v16 pc = exp2_nonpos(sv[a][c] - m_new);
      sum += pc;
      store16(p[a] + 16 * c, pc);
    }
    l[a] = l[a] * alpha[a] + hsum(sum);
    m[a] = m_new;
  }
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) {
    v16 acc[QG];
    for (int a = 0; a < QG; ++a) acc[a] = load16(o + a * D + d0) * alpha[a];
    for (int64_t j = 0; j < kn; ++j) {
      const v16 vr = load16(v + j * ldv + d0);
      for (int a = 0; a < QG; ++a) acc[a] += p[a][j] * vr;
    }
    for (int a = 0; a < QG; ++a) store16(o + a * D + d0, acc[a]);
  }
  for (; d0 < D; ++d0)  // head dims past the last multiple of 16 (D = 40, 59, ...)
    for (int a = 0; a < QG; ++a) {
      float acc = o[a * D + d0] * alpha[a];
      for (int64_t j = 0; j < kn; ++j) acc += p[a][j] * v[j * ldv + d0];
      o[a * D + d0] = acc;
    }
}

// One key tile for qn queries: groups of 4, then the rest one by one. Shared by the three dtypes, so
// the big inlined tile math is compiled once per ISA, not once per (dtype, ISA).
BLIP2_FAST_CLONES
void attend_tile(const float* __restrict__ q, const float* __restrict__ kt, const float* __restrict__ v, int64_t ldv,
                 const float* __restrict__ bias, int64_t qn, int64_t kn, int64_t D, float* __restrict__ m,
                 float* __restrict__ l, float* __restrict__ o) {
  int64_t i = 0;
  for (; i + 4 <= qn; i += 4) attend_group<4>(q + i * D, kt, v, ldv, bias, kn, D, m + i, l + i, o + i * D);
  for (; i < qn; ++i) attend_group<1>(q + i * D, kt, v, ldv, bias, kn, D, m + i, l + i, o + i * D);
}

// kt[d][j] = src[j][d] for j < kn (row stride ld), zero for kn <= j < kKB: the key tile transposed.
// 4x4 blocks through registers; the scalar version was a third of the kernel's time.
typedef float v4 __attribute__((vector_size(16), aligned(4)));
BLIP2_FAST_INLINE v4 load4(const float* p) {
  v4 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
BLIP2_FAST_INLINE void store4(float* p, v4 x) { std::memcpy(p, &x, sizeof(x)); }

BLIP2_FAST_INLINE void transpose_tile(const float* __restrict__ src, int64_t ld, int64_t kn, int64_t D,
                                      float* __restrict__ kt) {
  int64_t j = 0;
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
  for (; j + 4 <= kn; j += 4) {
    const float* r = src + j * ld;
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      const v4 r0 = load4(r + d), r1 = load4(r + ld + d), r2 = load4(r + 2 * ld + d), r3 = load4(r + 3 * ld + d);
      const v4 t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5), t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
      const v4 t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5), t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
      store4(kt + (d + 0) * kKB + j, __builtin_shufflevector(t0, t2, 0, 1, 4, 5));
      store4(kt + (d + 1) * kKB + j, __builtin_shufflevector(t0, t2, 2, 3, 6, 7));
      store4(kt + (d + 2) * kKB + j, __builtin_shufflevector(t1, t3, 0, 1, 4, 5));
      store4(kt + (d + 3) * kKB + j, __builtin_shufflevector(t1, t3, 2, 3, 6, 7));
    }
    for (; d < D; ++d)
      for (int64_t e = 0; e < 4; ++e) kt[d * kKB + j + e] = r[e * ld + d];
  }
#endif
  for (; j < kn; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * kKB + j] = src[j * ld + d];
  for (int64_t d = 0; d < D; ++d)
    for (int64_t e = kn; e < kKB; ++e) kt[d * kKB + e] = 0.0f;
}

// dst[j][d] = float(src[j * ld + d * sd]) for j < n: rows of a tile in fp32, row stride D.
template <typename T>
BLIP2_FAST_INLINE void convert_rows(const T* __restrict__ src, int64_t ld, int64_t sd, int64_t n, int64_t D,
                                    float* __restrict__ dst) {
  for (int64_t j = 0; j < n; ++j) {
    const T* r = src + j * ld;
    float* out = dst + j * D;
    if (sd == 1) {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(r[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(r[d * sd]);
    }
  }
}

struct Args {
  const void* q;       // [B, H, Nq, D], strides sq
  const void* k;       // [B, H, Nk, D], strides sk
  const void* v;       // [B, H, Nk, D], strides sv
  const bool* mask;    // [B, Nk], strides sm; nullptr = keep every key
  void* out;           // [B, H, Nq, D], contiguous
  int64_t sq[4], sk[4], sv[4], sm[2];
  int64_t B, H, Nq, Nk, D;
  int64_t nqb, QB;     // query blocks per (b, h) and queries per block
  float qscale;        // scale * log2(e)
};

// Work items [begin, end): item = (b * H + h) * nqb + query block.
template <typename T>
BLIP2_FAST_INLINE void run_items(const Args& A, int64_t begin, int64_t end) {
  const int64_t D = A.D, QB = A.QB;
  std::vector<float> qbuf(QB * D), kt(D * kKB), vbuf(kKB * D), o(QB * D), m(QB), l(QB);
  alignas(64) float bias[kKB];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t qb = item % A.nqb, h = (item / A.nqb) % A.H, b = item / (A.nqb * A.H);
    const int64_t i0 = qb * QB, qn = std::min(QB, A.Nq - i0);
    const T* qbh = static_cast<const T*>(A.q) + b * A.sq[0] + h * A.sq[1];
    const T* kbh = static_cast<const T*>(A.k) + b * A.sk[0] + h * A.sk[1];
    const T* vbh = static_cast<const T*>(A.v) + b * A.sv[0] + h * A.sv[1];
    for (int64_t i = 0; i < qn; ++i)
      for (int64_t d = 0; d < D; ++d) qbuf[i * D + d] = static_cast<float>(qbh[(i0 + i) * A.sq[2] + d * A.sq[3]]) * A.qscale;
    std::fill(o.begin(), o.end(), 0.0f);
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.0f);
    for (int64_t j0 = 0; j0 < A.Nk; j0 += kKB) {
      const int64_t kn = std::min(kKB, A.Nk - j0);
      bool any = false;
      for (int64_t j = 0; j < kKB; ++j) {
        const bool keep = j < kn && (!A.mask || A.mask[b * A.sm[0] + (j0 + j) * A.sm[1]]);
        bias[j] = keep ? 0.0f : kNegInf;
        any |= keep;
      }
      if (!any) continue;  // a fully padded tile changes nothing
      // fp32 rows with unit stride are read where they lie; anything else is converted to fp32 first.
      const bool k_direct = std::is_same_v<T, float> && A.sk[3] == 1;
      const bool v_direct = std::is_same_v<T, float> && A.sv[3] == 1;
      const T* kr = kbh + j0 * A.sk[2];
      const T* vr = vbh + j0 * A.sv[2];
      if (k_direct) {
        transpose_tile(reinterpret_cast<const float*>(kr), A.sk[2], kn, D, kt.data());
      } else {
        convert_rows(kr, A.sk[2], A.sk[3], kn, D, vbuf.data());  // vbuf as scratch, refilled below
        transpose_tile(vbuf.data(), D, kn, D, kt.data());
      }
      if (!v_direct) convert_rows(vr, A.sv[2], A.sv[3], kn, D, vbuf.data());
      const float* vt = v_direct ? reinterpret_cast<const float*>(vr) : vbuf.data();  // [kn, D], row stride ldv
      const int64_t ldv = v_direct ? A.sv[2] : D;
      attend_tile(qbuf.data(), kt.data(), vt, ldv, bias, qn, kn, D, m.data(), l.data(), o.data());
    }
    T* obh = static_cast<T*>(A.out) + ((b * A.H + h) * A.Nq + i0) * D;
    for (int64_t i = 0; i < qn; ++i) {
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;  // l == 0: every key masked -> zeros
      for (int64_t d = 0; d < D; ++d) obh[i * D + d] = static_cast<T>(o[i * D + d] * inv);
    }
  }
}

// Loaders per dtype and ISA: the fp16/bf16 -> fp32 conversions vectorise too.
BLIP2_FAST_CLONES void run_items_f32(const Args& A, int64_t begin, int64_t end) { run_items<float>(A, begin, end); }
BLIP2_FAST_CLONES void run_items_f16(const Args& A, int64_t begin, int64_t end) { run_items<c10::Half>(A, begin, end); }
BLIP2_FAST_CLONES void run_items_bf16(const Args& A, int64_t begin, int64_t end) {
  run_items<c10::BFloat16>(A, begin, end);
}

at::Tensor cross_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_padding_mask, std::optional<double> scale) {
  check_cross_attention_args(q, k, v, key_padding_mask, /*cuda=*/false);
  TORCH_CHECK(q.device().is_cpu(), "cross_attention: the CPU kernel got q on ", q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous [B, H, Nq, D]
  if (out.numel() == 0) return out;
  at::Tensor keep;
  if (key_padding_mask.has_value())
    keep = key_padding_mask->scalar_type() == at::kBool ? *key_padding_mask : key_padding_mask->ne(0);
  Args A{};
  A.q = q.const_data_ptr(), A.k = k.const_data_ptr(), A.v = v.const_data_ptr(), A.out = out.mutable_data_ptr();
  A.mask = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  for (int i = 0; i < 4; ++i) A.sq[i] = q.stride(i), A.sk[i] = k.stride(i), A.sv[i] = v.stride(i);
  A.sm[0] = keep.defined() ? keep.stride(0) : 0, A.sm[1] = keep.defined() ? keep.stride(1) : 0;
  A.B = q.size(0), A.H = q.size(1), A.Nq = q.size(2), A.Nk = k.size(2), A.D = q.size(3);
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(A.D));
  A.qscale = static_cast<float>(s) * kLog2e;
  // Split the queries only as far as the threads need: every query block re-converts the K/V tiles.
  const int64_t BH = A.B * A.H, want_items = 4 * static_cast<int64_t>(at::get_num_threads());
  A.nqb = std::min(A.Nq, (want_items + BH - 1) / BH);
  A.QB = (A.Nq + A.nqb - 1) / A.nqb;
  const auto run = q.scalar_type() == at::kFloat  ? run_items_f32
                   : q.scalar_type() == at::kHalf ? run_items_f16
                                                  : run_items_bf16;  // the checks allowed only these three
  at::parallel_for(0, BH * A.nqb, 1, [&](int64_t begin, int64_t end) { run(A, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(blip2_fast, CPU, m) { m.impl("cross_attention_fwd", &cross_attention_cpu); }

}  // namespace blip2_fast
