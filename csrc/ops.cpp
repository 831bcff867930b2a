// The schema of every op the C++/CUDA extension defines. Implementations register per dispatch key in
// <op>_cpu.cpp and <op>_cuda.cpp; the fake (meta) implementations are registered from Python
// (blip2_fast/_ext.py), so torch.compile can trace through the ops.
//
// A fragment, not TORCH_LIBRARY: the Triton kernels define their own ops in the same `blip2_fast`
// namespace from Python (torch.library.custom_op), and TORCH_LIBRARY would claim the namespace
// exclusively, so any Python `Library("blip2_fast", "DEF")` would then fail to load (or make this
// library fail). Op names stay unique, so fragments can be loaded in any order. Names follow the files:
// <op>_fwd for the op's kernels (cross_attention.cu + cross_attention_cpu.cpp: one op, two dispatch
// keys), <op>_cpu_fwd for a CPU-only kernel next to a Triton one that owns <op>_fwd.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(blip2_fast, m) {
  // q [B, H, Nq, D]; k, v [B, H, Nk, D]; key_padding_mask [B, Nk] (nonzero = keep); scale defaults to
  // D ** -0.5. Returns softmax(q kᵀ · scale) v as a contiguous [B, H, Nq, D] in q's dtype; a query whose
  // keys are all masked gets zeros.
  m.def("cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float? scale) -> Tensor");
  // CPU only (the GPU runs the Triton kernel): one decode query per sequence over its paged cache.
  // q [N, H, D]; k_cache, v_cache [num_blocks, block_size, H, D]; block_tables int32 [N, max_blocks];
  // seq_lens int32 [N]; rel_bias [H, max_len] or None (T5). Returns a contiguous [N, H, D] in q's dtype.
  m.def("paged_attention_cpu_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, Tensor? rel_bias) -> Tensor");
}
