// The schema of every op the C++/CUDA extension defines. Implementations register per dispatch key in
// <op>_cpu.cpp and <op>_cuda.cpp; the fake (meta) implementations are registered from Python
// (blip2_fast/_ext.py), so torch.compile can trace through the ops.
//
// A fragment, not TORCH_LIBRARY: the Triton kernels define their own ops in the same `blip2_fast`
// namespace from Python (torch.library.custom_op), and TORCH_LIBRARY would claim the namespace
// exclusively, so any Python `Library("blip2_fast", "DEF")` would then fail to load (or make this
// library fail). Op names stay unique, so fragments can be loaded in any order.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(blip2_fast, m) {
  // q [B, H, Nq, D]; k, v [B, H, Nk, D]; key_padding_mask [B, Nk] (nonzero = keep); scale defaults to
  // D ** -0.5. Returns softmax(q kᵀ · scale) v as a contiguous [B, H, Nq, D] in q's dtype; a query whose
  // keys are all masked gets zeros.
  m.def("cross_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float? scale) -> Tensor");
}
