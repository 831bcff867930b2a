// CPU kernel of blip2_fast::greedy_screen_cpu (schema in ops.cpp, spec: greedy_head.screen_candidates_ref).
//
// The greedy head's screen after its bf16 GEMM: per row of the screened logits a [n, V], the largest
// |a_v| (for the row's error bound), the banned ids set to -inf, the row's max, and every id whose
// screened logit is within the margin of it. torch spends ~1 ms of a batch-8 decode step on this as
// six passes (amax, amin, ge, nonzero, bincount, indexing) that each write a [n, V] temporary; here
// it is three read passes per row, the rows spread over torch's threads, nothing [n, V] allocated.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "cpu_common.h"

namespace blip2_fast {
namespace {

// 8-float vectors in GCC's vector extension: each target clone (BLIP2_FAST_CLONES) lowers them to its
// ISA (ymm on AVX2 and AVX-512), where plain per-lane loops stay scalar (no -ffast-math: the compiler
// will not reorder a max reduction on its own). Four of them per step hide the max/compare latency.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
constexpr int64_t kStep = 32;  // floats per loop step: four vectors

BLIP2_FAST_INLINE vf8 load8(const float* p) {
  vf8 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

struct RowStats {
  float max_abs;  // max |a_v| over the row
  bool nan;       // whether the row holds a NaN (then max_abs means nothing)
};

BLIP2_FAST_INLINE RowStats abs_max(const float* a, int64_t V) {
  vf8 hi[4], lo[4];
  vi8 bad = {};
  const vf8 first = {a[0], a[0], a[0], a[0], a[0], a[0], a[0], a[0]};
  for (int u = 0; u < 4; ++u) hi[u] = lo[u] = first;
  int64_t v = 0;
  for (; v + kStep <= V; v += kStep)
    for (int u = 0; u < 4; ++u) {
      const vf8 x = load8(a + v + 8 * u);
      hi[u] = x > hi[u] ? x : hi[u];
      lo[u] = x < lo[u] ? x : lo[u];
      bad |= (x != x);
    }
  float h = a[0], l = a[0];
  bool nan = false;
  for (int u = 0; u < 4; ++u)
    for (int e = 0; e < 8; ++e) h = std::max(h, hi[u][e]), l = std::min(l, lo[u][e]), nan |= bad[e] != 0;
  for (; v < V; ++v) h = std::max(h, a[v]), l = std::min(l, a[v]), nan |= (a[v] != a[v]);
  return {std::max(h, -l), nan};
}

BLIP2_FAST_INLINE float row_max(const float* a, int64_t V) {  // the row holds no NaN here
  vf8 hi[4];
  const vf8 first = {a[0], a[0], a[0], a[0], a[0], a[0], a[0], a[0]};
  for (int u = 0; u < 4; ++u) hi[u] = first;
  int64_t v = 0;
  for (; v + kStep <= V; v += kStep)
    for (int u = 0; u < 4; ++u) {
      const vf8 x = load8(a + v + 8 * u);
      hi[u] = x > hi[u] ? x : hi[u];
    }
  float h = a[0];
  for (int u = 0; u < 4; ++u)
    for (int e = 0; e < 8; ++e) h = std::max(h, hi[u][e]);
  for (; v < V; ++v) h = std::max(h, a[v]);
  return h;
}

// Ids v with a_v >= t, ascending, into out[0 .. cap); returns how many there are, counting past cap
// only as far as cap + 1 (the caller needs "more than cap", not how many more).
BLIP2_FAST_INLINE int64_t select_at_least(const float* a, int64_t V, float t, int64_t* out, int64_t cap) {
  const vf8 tv = {t, t, t, t, t, t, t, t};
  int64_t n = 0, v = 0;
  for (; v + kStep <= V; v += kStep) {
    vi8 hit = {};
    for (int u = 0; u < 4; ++u) hit |= (load8(a + v + 8 * u) >= tv);
    bool any = false;
    for (int e = 0; e < 8; ++e) any |= hit[e] != 0;
    if (!any) continue;  // the common case: compares only, no branch per element
    for (int64_t w = v; w < v + kStep; ++w)
      if (a[w] >= t) {
        if (n == cap) return cap + 1;
        out[n++] = w;
      }
  }
  for (; v < V; ++v)
    if (a[v] >= t) {
      if (n == cap) return cap + 1;
      out[n++] = v;
    }
  return n;
}

// The threshold rounded down to a float: a float x satisfies x >= result exactly when x >= thr, save
// possibly x == result itself (one extra candidate is rescored exactly, never lost).
inline float floor_to_float(double thr) {
  if (std::isnan(thr)) return std::numeric_limits<float>::quiet_NaN();
  float t = static_cast<float>(thr);
  if (static_cast<double>(t) > thr) t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  return t;
}

struct ScreenArgs {
  float* a;                 // [n, V] row-contiguous, banned ids overwritten with -inf
  const double* base;       // [n]: the row's bound, less its rel * max|a| term
  double rel;
  const int64_t* ban_ptr;   // [n + 1]: row i's banned ids are ban_ids[ban_ptr[i] .. ban_ptr[i + 1])
  const int64_t* ban_ids;
  int64_t* cols;            // [n, cap], -1 past the count
  int64_t* counts;          // [n]
  int64_t V, cap;
};

// One row: the largest |a_v| before the bans (the bound covers every id's screened logit), the bans,
// then the candidates within 2 (base + rel max|a|) of the row max into cols; returns their count
// (0 for a NaN row, cap + 1 for more than cap).
BLIP2_FAST_INLINE int64_t screen_row(float* a, int64_t V, const int64_t* bans, const int64_t* bans_end, double base,
                                     double rel, int64_t* cols, int64_t cap) {
  const RowStats s = abs_max(a, V);
  for (const int64_t* b = bans; b < bans_end; ++b)
    if (*b >= 0 && *b < V) a[*b] = -std::numeric_limits<float>::infinity();
  if (s.nan) return 0;  // no candidate: the caller scores the row in full
  const double margin = 2.0 * (base + rel * static_cast<double>(s.max_abs));
  const float t = floor_to_float(static_cast<double>(row_max(a, V)) - margin);
  return select_at_least(a, V, t, cols, cap);  // NaN t: no candidate
}

BLIP2_FAST_INLINE void screen_rows_impl(const ScreenArgs& A, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    A.counts[i] = screen_row(A.a + i * A.V, A.V, A.ban_ids + A.ban_ptr[i], A.ban_ids + A.ban_ptr[i + 1], A.base[i],
                             A.rel, A.cols + i * A.cap, A.cap);
}

BLIP2_FAST_CLONES void screen_rows(const ScreenArgs& A, int64_t begin, int64_t end) { screen_rows_impl(A, begin, end); }

// Both ops' screen arguments: the logits a [n, V], the bans as CSR (row i's ids are
// ban_ids[ban_ptr[i] .. ban_ptr[i + 1])) and the candidate cap.
void check_screen_args(const char* op, const at::Tensor& a, const at::Tensor& ban_ptr, const at::Tensor& ban_ids,
                       int64_t max_candidates) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kFloat && a.is_contiguous() && a.size(1) > 0,
              op, ": a must be a contiguous float32 [n, V] with V > 0, got ", a.sizes(), " ", a.scalar_type());
  const int64_t n = a.size(0);
  TORCH_CHECK(ban_ptr.dim() == 1 && ban_ptr.size(0) == n + 1 && ban_ptr.scalar_type() == at::kLong && ban_ptr.is_contiguous(),
              op, ": ban_ptr must be a contiguous int64 [", n + 1, "], got ", ban_ptr.sizes());
  TORCH_CHECK(ban_ids.dim() == 1 && ban_ids.scalar_type() == at::kLong && ban_ids.is_contiguous(),
              op, ": ban_ids must be a contiguous int64 vector, got ", ban_ids.sizes());
  TORCH_CHECK(max_candidates > 0, op, ": max_candidates must be positive, got ", max_candidates);
  const int64_t* bp = ban_ptr.data_ptr<int64_t>();
  TORCH_CHECK(bp[0] == 0 && bp[n] == ban_ids.size(0), op, ": ban_ptr must run from 0 to len(ban_ids)");
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(bp[i] <= bp[i + 1], op, ": ban_ptr must not decrease");
}

std::tuple<at::Tensor, at::Tensor> greedy_screen_cpu(const at::Tensor& a, const at::Tensor& base, double rel,
                                                     const at::Tensor& ban_ptr, const at::Tensor& ban_ids,
                                                     int64_t max_candidates) {
  check_screen_args("greedy_screen", a, ban_ptr, ban_ids, max_candidates);
  const int64_t n = a.size(0), V = a.size(1);
  TORCH_CHECK(base.dim() == 1 && base.size(0) == n && base.scalar_type() == at::kDouble && base.is_contiguous(),
              "greedy_screen: base must be a contiguous float64 [", n, "], got ", base.sizes(), " ", base.scalar_type());
  const int64_t* bp = ban_ptr.data_ptr<int64_t>();
  at::Tensor cols = at::full({n, max_candidates}, -1, a.options().dtype(at::kLong));
  at::Tensor counts = at::empty({n}, a.options().dtype(at::kLong));
  const ScreenArgs A{a.data_ptr<float>(), base.data_ptr<double>(), rel, bp, ban_ids.data_ptr<int64_t>(),
                     cols.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), V, max_candidates};
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { screen_rows(A, b, e); });
  return {cols, counts};
}

// ---- greedy_pick_cpu: the whole host side of the screen in one call (spec: ScreenedArgmax.__call__) ----
//
// Per row: the bound's base from h (ScreenedArgmax._bound_base: the norms of h - bf16(h) and of
// bf16(h), in float64), the screen above, then the candidates' logits recomputed from h and the fp32
// head in float64 (closer to the exact logits than any fp32 sum; the best is taken, ties to the lower
// id). After the head's 50 MB stream every small torch op runs cold (~15 us each, ~0.4 ms a batch-8
// step for the ten-odd ops this replaces).

struct PickArgs {
  float* a;  // [n, V] screened logits, banned ids overwritten with -inf
  const float* h;  // [n, E]
  const float* w;  // [V, E]
  const int64_t* ban_ptr;
  const int64_t* ban_ids;
  int64_t* cols;  // [n, cap]: the screen's candidates
  int64_t* best;  // [n]: the id, or -1 where the row must be scored in full
  int64_t V, E, cap;
  double w_max, r_max, safety, rel;
};

inline float bf16_round(float x) { return static_cast<float>(c10::BFloat16(x)); }  // as Tensor.bfloat16()

BLIP2_FAST_INLINE void pick_rows_impl(const PickArgs& P, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float* h = P.h + i * P.E;
    double d2 = 0.0, b2 = 0.0;
    for (int64_t e = 0; e < P.E; ++e) {
      const float hb = bf16_round(h[e]);
      const double d = static_cast<double>(h[e]) - static_cast<double>(hb);  // exact: h - bf16(h) fits a float
      d2 += d * d;
      b2 += static_cast<double>(hb) * hb;
    }
    const double nb = std::sqrt(b2);
    const double base = P.safety * (std::sqrt(d2) * P.w_max + nb * P.r_max +
                                    std::ldexp(1.0, -120) * static_cast<double>(P.E) * (1.0 + P.w_max + nb));
    int64_t* cols = P.cols + i * P.cap;
    const int64_t c = screen_row(P.a + i * P.V, P.V, P.ban_ids + P.ban_ptr[i], P.ban_ids + P.ban_ptr[i + 1], base,
                                 P.rel, cols, P.cap);
    if (c <= 0 || c > P.cap) {
      P.best[i] = -1;
      continue;
    }
    double top = 0.0;
    int64_t arg = -1;
    for (int64_t j = 0; j < c; ++j) {  // ids ascend: strictly greater keeps the lower id on a tie
      const float* wv = P.w + cols[j] * P.E;
      double s = 0.0;
      for (int64_t e = 0; e < P.E; ++e) s += static_cast<double>(h[e]) * static_cast<double>(wv[e]);
      if (arg < 0 || s > top) top = s, arg = cols[j];
    }
    P.best[i] = arg;
  }
}

BLIP2_FAST_CLONES void pick_rows(const PickArgs& P, int64_t begin, int64_t end) { pick_rows_impl(P, begin, end); }

at::Tensor greedy_pick_cpu(const at::Tensor& a, const at::Tensor& h, const at::Tensor& weight, double w_max,
                           double r_max, double safety, double rel, const at::Tensor& ban_ptr,
                           const at::Tensor& ban_ids, int64_t max_candidates) {
  check_screen_args("greedy_pick", a, ban_ptr, ban_ids, max_candidates);
  const int64_t n = a.size(0), V = a.size(1);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == n && h.scalar_type() == at::kFloat && h.is_contiguous(),
              "greedy_pick: h must be a contiguous float32 [", n, ", E], got ", h.sizes(), " ", h.scalar_type());
  const int64_t E = h.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == V && weight.size(1) == E && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "greedy_pick: weight must be a contiguous float32 [", V, ", ", E, "], got ", weight.sizes(), " ",
              weight.scalar_type());
  const at::Tensor cols = at::empty({n, max_candidates}, a.options().dtype(at::kLong));
  at::Tensor best = at::empty({n}, a.options().dtype(at::kLong));
  const PickArgs P{a.data_ptr<float>(), h.data_ptr<float>(), weight.data_ptr<float>(), ban_ptr.data_ptr<int64_t>(),
                   ban_ids.data_ptr<int64_t>(), cols.data_ptr<int64_t>(), best.data_ptr<int64_t>(), V, E,
                   max_candidates, w_max, r_max, safety, rel};
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { pick_rows(P, b, e); });
  return best;
}

}  // namespace

TORCH_LIBRARY_IMPL(blip2_fast, CPU, m) {
  m.impl("greedy_screen_cpu", &greedy_screen_cpu);
  m.impl("greedy_pick_cpu", &greedy_pick_cpu);
}

}  // namespace blip2_fast
