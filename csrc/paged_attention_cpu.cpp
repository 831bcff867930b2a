// CPU kernel of blip2_fast::paged_attention_cpu_fwd (schema in ops.cpp, spec: reference.paged_attention_ref).
//
// One decode query per sequence over its paged KV cache. Work item = (sequence, head), spread over
// threads with at::parallel_for. A decode step's context is short next to a prefill (tens to a few
// thousand keys), so each item keeps its fp32 scores in a buffer and takes an exact two-pass softmax;
// the reference gathers every sequence to the block table's full width and masks, this reads only
// the sequence's own blocks, in place. The GPU path is the Triton kernel (kernels/paged_attention.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_common.h"
#include "cpu_ops.h"
#include "cpu_vec.h"

namespace blip2_fast {
namespace {

struct PagedArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* tables;  // [N, W], row stride W
  const int32_t* lens;    // [N]
  const float* bias;      // [H, max_dist] fp32 contiguous, or nullptr
  int64_t N, H, D, W, block_size, max_dist;
  int64_t groups;  // head groups per sequence: work items = N * groups
  int64_t sq[3];  // q strides (N, H, D)
  int64_t sc[4];  // cache strides (block, slot, H, D); K and V share them
  float scale;
  int64_t prefetch;  // tokens ahead to prefetch (0: none; see prefetch_tokens)
};

// Tokens ahead to prefetch, about 4 KB of rows. Only where the hardware alone does poorly: a row of
// 4 KB or less (a block of 16 such rows is one short stream) or part of a row (the item's heads when
// a sequence's heads are split between threads: a strided read). Cold cache, one thread, measured
// on a Zen 4: [8 seqs, 8 heads x 64] fp32 rows (2 KB) 1.2-1.25x faster at 50-200 tokens, 32 x 80
// heads split in two 1.5x; whole 10 KB rows (32 x 80) were 1.2x slower with it: their 160 KB blocks
// stream well, and each row's 160 prefetches at once crowded the loads. BLIP2_FAST_ATTN_PREFETCH=0
// turns it off (read per call, for A/B runs in one process).
int64_t prefetch_tokens(const PagedArgs& A, int64_t elem_bytes) {
  const char* env = std::getenv("BLIP2_FAST_ATTN_PREFETCH");
  if (env != nullptr && env[0] == '0' && env[1] == '\0') return 0;
  const int64_t heads = (A.H + A.groups - 1) / A.groups;
  const int64_t row = heads * A.D * elem_bytes;  // the bytes of one token one item reads, K or V
  if (A.groups == 1 && row > 4096) return 0;
  return (4096 + row - 1) / row;
}

// Ask for token t's rows of this item's heads (nh heads from h0) ahead of use. A row is one
// token's K or V: H * D contiguous values within a block, and a block holds block_size such rows;
// the blocks of a sequence lie anywhere in the pool, so every block boundary starts a new stream
// that the hardware prefetch must first detect, each time the row it misses is read cold (the
// weights streamed through since the layer's previous step left nothing of the cache in it).
template <typename T>
BLIP2_FAST_INLINE void prefetch_row(const PagedArgs& A, const T* cache, const int32_t* table, int64_t t,
                                    int64_t h0, int64_t nh) {
  const char* p = reinterpret_cast<const char*>(cache + table[t / A.block_size] * A.sc[0] +
                                                (t % A.block_size) * A.sc[1] + h0 * A.sc[2]);
  const int64_t bytes = ((nh - 1) * A.sc[2] + A.D) * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// The 16 lanes' sum as a tree (halves added four times): a running sum over the lanes is a chain
// of 15 dependent adds the compiler may not reorder (no -ffast-math), paid once per token and head.
BLIP2_FAST_INLINE float hsum16(const vec::v16& x) {
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  typedef float v4 __attribute__((vector_size(16), aligned(4)));
  const v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
#else  // GCC before 12: the same tree, lane by lane
  float a[8], b[4];
  for (int e = 0; e < 8; ++e) a[e] = x[e] + x[e + 8];
  for (int e = 0; e < 4; ++e) b[e] = a[e] + a[e + 4];
  return (b[0] + b[2]) + (b[1] + b[3]);
#endif
}

// q·k over D: 16 lanes at a time, the tail (D % 16) scalar.
template <typename T>
BLIP2_FAST_INLINE float dot(const float* q, const T* k, int64_t D) {
  vec::v16 lanes{};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) lanes += vec::load16(q + d) * vec::load16_f32(k + d);
  float s = hsum16(lanes);
  for (; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

// acc[0:D] += p * v[0:D]
template <typename T>
BLIP2_FAST_INLINE void axpy(float* acc, float p, const T* v, int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) vec::store16(acc + d, vec::load16(acc + d) + p * vec::load16_f32(v + d));
  for (; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
}

// One work item = one sequence and a group of its heads. Token t's keys for all heads sit together
// ([slot, H, D] within a block), so the loops run token-major and read each K/V row contiguously.
template <typename T>
BLIP2_FAST_INLINE void run_items(const PagedArgs& A, int64_t begin, int64_t end) {
  const T* q = static_cast<const T*>(A.q);
  const T* kc = static_cast<const T*>(A.k);
  const T* vc = static_cast<const T*>(A.v);
  T* out = static_cast<T*>(A.out);
  const int64_t D = A.D, G = A.groups, HG = (A.H + G - 1) / G;
  std::vector<float> qf(HG * D), acc(HG * D), scores, sums(HG);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / G, h0 = (item % G) * HG, nh = std::min(HG, A.H - h0);
    if (nh <= 0) continue;
    const int64_t L = A.lens[n];
    const int32_t* table = A.tables + n * A.W;
    for (int64_t j = 0; j < nh; ++j)
      for (int64_t d = 0; d < D; ++d)
        qf[j * D + d] = static_cast<float>(q[n * A.sq[0] + (h0 + j) * A.sq[1] + d * A.sq[2]]) * A.scale;
    scores.resize(nh * L);  // (head, token)
    const int64_t P = A.prefetch;
    if (item == begin)  // the first rows of this thread's first item; later items were asked for before
      for (int64_t t = 0; t < std::min(P, L); ++t) prefetch_row(A, kc, table, t, h0, nh);
    for (int64_t t = 0; t < L; ++t) {
      if (P > 0) {  // one stream: this item's keys, then its values
        if (t + P < L) prefetch_row(A, kc, table, t + P, h0, nh);
        else if (t + P - L < L) prefetch_row(A, vc, table, t + P - L, h0, nh);
      }
      const T* row = kc + table[t / A.block_size] * A.sc[0] + (t % A.block_size) * A.sc[1];
      for (int64_t j = 0; j < nh; ++j) {
        float s = dot(qf.data() + j * D, row + (h0 + j) * A.sc[2], D);  // D is unit-stride (checked)
        if (A.bias != nullptr) s += A.bias[(h0 + j) * A.max_dist + std::min(L - 1 - t, A.max_dist - 1)];
        scores[j * L + t] = s;
      }
    }
    for (int64_t j = 0; j < nh; ++j) {  // softmax numerators; mx is finite unless a score is inf/NaN
      float* sj = scores.data() + j * L;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < L; ++t) mx = std::max(mx, sj[t]);
      vec::v16 lanes{};  // 16 at a time: std::exp, scalar, was 70% of a batch-8 decode step's attention
      int64_t t = 0;
      for (; t + 16 <= L; t += 16) {
        const vec::v16 e = vec::exp16(vec::load16(sj + t) - mx);
        vec::store16(sj + t, e);
        lanes += e;
      }
      if (t < L) {  // the tail through a padded copy (its dead lanes are dropped, never summed)
        float buf[16] = {};
        std::memcpy(buf, sj + t, (L - t) * sizeof(float));
        vec::store16(buf, vec::exp16(vec::load16(buf) - mx));
        std::memcpy(sj + t, buf, (L - t) * sizeof(float));
        for (int64_t e = 0; e < L - t; ++e) lanes[e] += buf[e];
      }
      float sum = 0.0f;
      for (int e = 0; e < 16; ++e) sum += lanes[e];
      sums[j] = sum;
    }
    std::fill(acc.begin(), acc.begin() + nh * D, 0.0f);
    // the next item's first keys, during this item's last values (none past this thread's range)
    const int64_t nxt = item + 1, nn = nxt / G, nh0 = (nxt % G) * HG, nnh = std::min(HG, A.H - nh0);
    const bool ahead = P > 0 && nxt < end && nnh > 0;
    const int64_t nL = ahead ? A.lens[nn] : 0;
    for (int64_t t = 0; t < L; ++t) {
      if (P > 0) {
        if (t + P < L) prefetch_row(A, vc, table, t + P, h0, nh);
        else if (ahead && t + P - L < nL) prefetch_row(A, kc, A.tables + nn * A.W, t + P - L, nh0, nnh);
      }
      const T* row = vc + table[t / A.block_size] * A.sc[0] + (t % A.block_size) * A.sc[1];
      for (int64_t j = 0; j < nh; ++j) {
        const float p = scores[j * L + t];
        axpy(acc.data() + j * D, p, row + (h0 + j) * A.sc[2], D);
      }
    }
    for (int64_t j = 0; j < nh; ++j) {
      T* op = out + (n * A.H + h0 + j) * D;
      const float inv = 1.0f / sums[j];
      for (int64_t d = 0; d < D; ++d) op[d] = static_cast<T>(acc[j * D + d] * inv);
    }
  }
}

BLIP2_FAST_CLONES void run_items_f32(const PagedArgs& A, int64_t b, int64_t e) { run_items<float>(A, b, e); }
BLIP2_FAST_CLONES void run_items_f16(const PagedArgs& A, int64_t b, int64_t e) { run_items<c10::Half>(A, b, e); }
BLIP2_FAST_CLONES void run_items_bf16(const PagedArgs& A, int64_t b, int64_t e) { run_items<c10::BFloat16>(A, b, e); }

}  // namespace

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                               const std::optional<at::Tensor>& rel_bias) {
  TORCH_CHECK(q.dim() == 3, "paged_attention: q must have shape [N, H, D], got ", q.sizes());
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == H && k_cache.size(3) == D,
              "paged_attention: k_cache must have shape [num_blocks, block_size, H, D] with H, D = ", H, ", ", D,
              " (from q ", q.sizes(), "), got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.strides() == k_cache.strides(),
              "paged_attention: v_cache must have k_cache's shape ", k_cache.sizes(), " and strides, got ",
              v_cache.sizes(), " / ", v_cache.strides());
  TORCH_CHECK(is_supported_dtype(q.scalar_type()), "paged_attention: q must be float32, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_attention: k_cache and v_cache must have q's dtype ", q.scalar_type(), ", got ",
              k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.stride(3) == 1 || D == 1, "paged_attention: k_cache/v_cache must be contiguous along D");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == N && block_tables.scalar_type() == at::kInt,
              "paged_attention: block_tables must be int32 [N=", N, ", max_blocks], got ", block_tables.scalar_type(),
              " ", block_tables.sizes());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == N && seq_lens.scalar_type() == at::kInt,
              "paged_attention: seq_lens must be int32 [N=", N, "], got ", seq_lens.scalar_type(), " ", seq_lens.sizes());
  for (const at::Tensor* t : {&k_cache, &v_cache, &block_tables, &seq_lens})
    TORCH_CHECK(t->device().is_cpu(), "paged_attention: the CPU kernel got a tensor on ", t->device());
  const at::Tensor tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  const int64_t W = tables.size(1), block_size = k_cache.size(1), num_blocks = k_cache.size(0);
  const int32_t* tp = tables.const_data_ptr<int32_t>();
  const int32_t* lp = lens.const_data_ptr<int32_t>();
  // Validate up front: a bad table entry would read outside the pool from inside the parallel region.
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(lp[n] >= 1 && lp[n] <= W * block_size, "paged_attention: seq_lens[", n, "] = ", lp[n],
                " must be in [1, max_blocks * block_size = ", W * block_size, "]");
    for (int64_t b = 0; b < (lp[n] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tp[n * W + b] >= 0 && tp[n * W + b] < num_blocks, "paged_attention: block_tables[", n, ", ", b,
                  "] = ", tp[n * W + b], " is outside the pool of ", num_blocks, " blocks");
  }
  at::Tensor bias;
  if (rel_bias.has_value()) {
    TORCH_CHECK(rel_bias->dim() == 2 && rel_bias->size(0) == H && rel_bias->size(1) >= 1,
                "paged_attention: rel_bias must have shape [H=", H, ", max_len >= 1], got ", rel_bias->sizes());
    bias = rel_bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({N, H, D}, q.options());
  if (out.numel() == 0) return out;
  PagedArgs A{};
  A.q = q.const_data_ptr(), A.k = k_cache.const_data_ptr(), A.v = v_cache.const_data_ptr();
  A.out = out.mutable_data_ptr(), A.tables = tp, A.lens = lp;
  A.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  A.N = N, A.H = H, A.D = D, A.W = W, A.block_size = block_size, A.max_dist = bias.defined() ? bias.size(1) : 1;
  for (int i = 0; i < 3; ++i) A.sq[i] = q.stride(i);
  for (int i = 0; i < 4; ++i) A.sc[i] = k_cache.stride(i);
  A.scale = static_cast<float>(scale);
  const auto run = q.scalar_type() == at::kFloat  ? run_items_f32
                   : q.scalar_type() == at::kHalf ? run_items_f16
                                                  : run_items_bf16;  // the checks allowed only these three
  // Split heads only when there are too few sequences to keep every thread busy (batch-1 decode).
  const int64_t threads = at::get_num_threads();
  A.groups = N >= 2 * threads ? 1 : std::min<int64_t>(H, (2 * threads + N - 1) / N);
  A.prefetch = prefetch_tokens(A, q.element_size());
  at::parallel_for(0, N * A.groups, 1, [&](int64_t begin, int64_t end) { run(A, begin, end); });
  return out;
}

TORCH_LIBRARY_IMPL(blip2_fast, CPU, m) { m.impl("paged_attention_cpu_fwd", &paged_attention_cpu); }

}  // namespace blip2_fast
