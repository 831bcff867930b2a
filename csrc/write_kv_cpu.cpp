// CPU kernel of blip2_fast::write_kv_cpu_fwd (schema in ops.cpp, spec: reference.write_kv_ref).
//
// New keys and values into the paged caches, in place: row t of k / v [T, H, D] goes to flat slot
// slot_mapping[t] (block * block_size + offset) of k_cache / v_cache [num_blocks, block_size, H, D];
// a negative slot skips the row (padding). The reference is two index_copy_ plus a padding check
// (ge, all, a host sync) and casts: five to seven torch ops per layer, ~25 us of a decode step's
// layer on the CPU for 16 KB of copies. Every slot is checked before any row is written, so a bad
// slot changes nothing.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "checks.h"
#include "cpu_ops.h"

namespace blip2_fast {
namespace {

template <typename S, typename C>
void copy_row(const S* src, int64_t sh, int64_t sd, C* dst, int64_t H, int64_t D) {
  if constexpr (std::is_same_v<S, C>) {
    if (sd == 1 && sh == D) {  // the row is one run (a view of a fused qkv projection still is)
      std::memcpy(dst, src, H * D * sizeof(C));
      return;
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) dst[h * D + d] = static_cast<C>(static_cast<float>(src[h * sh + d * sd]));
}

template <typename S, typename C>
void write_rows(const at::Tensor& x, at::Tensor& cache, const int64_t* slots, int64_t T) {
  const S* src = x.const_data_ptr<S>();
  C* dst = cache.mutable_data_ptr<C>();
  const int64_t H = cache.size(2), D = cache.size(3);
  const int64_t st = x.stride(0), sh = x.stride(1), sd = x.stride(2);
  for (int64_t t = 0; t < T; ++t)
    if (slots[t] >= 0) copy_row<S, C>(src + t * st, sh, sd, dst + slots[t] * H * D, H, D);
}

template <typename C>
void write_cache(const at::Tensor& x, at::Tensor& cache, const int64_t* slots, int64_t T) {
  switch (x.scalar_type()) {
    case at::kFloat: return write_rows<float, C>(x, cache, slots, T);
    case at::kHalf: return write_rows<c10::Half, C>(x, cache, slots, T);
    default: return write_rows<c10::BFloat16, C>(x, cache, slots, T);  // the checks allowed only these three
  }
}

void write(const at::Tensor& x, at::Tensor& cache, const int64_t* slots, int64_t T) {
  switch (cache.scalar_type()) {
    case at::kFloat: return write_cache<float>(x, cache, slots, T);
    case at::kHalf: return write_cache<c10::Half>(x, cache, slots, T);
    default: return write_cache<c10::BFloat16>(x, cache, slots, T);
  }
}

}  // namespace

void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4, "write_kv: k_cache must have shape [num_blocks, block_size, H, D], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "write_kv: v_cache must have k_cache's shape ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "write_kv: the caches must be contiguous");
  const int64_t H = k_cache.size(2), D = k_cache.size(3), num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == H && k.size(2) == D, "write_kv: k must have shape [T, H, D] with H, D = ",
              H, ", ", D, " (from the cache), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "write_kv: v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const at::Tensor* const tensors[] = {&k, &v, &k_cache, &v_cache, &slot_mapping};
  for (const at::Tensor* t : {tensors[0], tensors[1], tensors[2], tensors[3]})
    TORCH_CHECK(is_supported_dtype(t->scalar_type()), "write_kv: k, v and the caches must be float32, float16 or "
                "bfloat16, got ", t->scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "write_kv: v_cache must have k_cache's dtype ",
              k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) &&
                  (slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt),
              "write_kv: slot_mapping must be int32 or int64 [T = ", k.size(0), "], got ", slot_mapping.scalar_type(),
              " ", slot_mapping.sizes());
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->device().is_cpu(), "write_kv: the CPU kernel got a tensor on ", t->device());
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  const int64_t T = k.size(0);
  for (int64_t t = 0; t < T; ++t)  // all of them before any write: a bad slot leaves the caches as they were
    TORCH_CHECK(sp[t] < num_slots, "write_kv: slot_mapping[", t, "] = ", sp[t], " is outside the cache's ",
                num_slots, " slots");
  if (H * D == 0) return;
  write(k, k_cache, sp, T);
  write(v, v_cache, sp, T);
}

TORCH_LIBRARY_IMPL(blip2_fast, CPU, m) { m.impl("write_kv_cpu_fwd", &write_kv_cpu); }

}  // namespace blip2_fast
