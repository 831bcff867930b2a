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
  // CPU only: the small-M linear of decode (csrc/linear_cpu.cpp). linear_pack_cpu packs weight [N, K]
  // once, as float32 [ceil(N/32), K, 32] or bfloat16 [ceil(N/32), ceil(K/2), 32, 2]; linear_cpu returns
  // act(x @ Wᵀ + bias) [..., N] in x's dtype for x [..., K] (float32; bf16 weights also take bfloat16);
  // activation: "none", "relu" or "gelu" (erf); isa: "auto" or a cap, "avx512_bf16", "avx512", "avx2",
  // "scalar" (linear_cpu_isa names the kernel a cap resolves to on this CPU).
  m.def("linear_pack_cpu(Tensor weight, ScalarType dtype) -> Tensor");
  m.def("linear_cpu(Tensor x, Tensor packed, Tensor? bias, int out_features, str activation, str isa) -> Tensor");
  m.def("linear_cpu_out(Tensor x, Tensor packed, Tensor? bias, int out_features, str activation, str isa, "
        "Tensor(a!) out) -> ()");
  m.def("linear_cpu_isa(str isa) -> str");
  // CPU only: the greedy head's screen (csrc/greedy_screen_cpu.cpp). a: the screened logits [n, V]
  // float32 (banned ids set to -inf in place); base float64 [n]; row i's banned ids are
  // ban_ids[ban_ptr[i]:ban_ptr[i + 1]]. Returns (cols int64 [n, max_candidates] padded with -1, counts
  // int64 [n]: 0 = no candidate, max_candidates + 1 = more than that).
  m.def("greedy_screen_cpu(Tensor(a!) a, Tensor base, float rel, Tensor ban_ptr, Tensor ban_ids, "
        "int max_candidates) -> (Tensor, Tensor)");
  // CPU only: the screen plus its bound's base from h [n, E] and the candidates' recheck against the
  // fp32 head weight [V, E] in float64; returns int64 [n], the greedy id or -1 (score the row in full).
  m.def("greedy_pick_cpu(Tensor(a!) a, Tensor h, Tensor weight, float w_max, float r_max, float safety, float rel, "
        "Tensor ban_ptr, Tensor ban_ids, int max_candidates) -> Tensor");
  // CPU only (the GPU runs the Triton kernel's rms_norm_fwd): T5's RMSNorm (csrc/rms_norm_cpu.cpp).
  // x [..., N]; weight [N]; residual x's shape and dtype, or None. Returns (y in x's dtype, x + residual;
  // an empty tensor without a residual).
  m.def("rms_norm_cpu_fwd(Tensor x, Tensor weight, Tensor? residual, float eps) -> (Tensor, Tensor)");
  // CPU only (the GPU runs the Triton kernel's write_kv_fwd): k, v [T, H, D] into the paged caches
  // [num_blocks, block_size, H, D] (contiguous) at slot_mapping [T] (int32 / int64; negative = skip).
  m.def("write_kv_cpu_fwd(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  // CPU only: one pre-LayerNorm OPT decoder layer at decode (csrc/opt_decode_block_cpu.cpp), composed of
  // the kernels above. x [N, E] float32 (one new token per sequence); the four weights packed float32
  // (linear_pack_cpu; qkv [3E, E] with q's rows pre-scaled, fc1 [ffn, E], fc2 [E, ffn]); the token's K/V
  // are written at slot_mapping, then attended with block_tables / seq_lens. Returns the layer's
  // output [N, E]; activation: fc1's, "relu" or "gelu".
  m.def("opt_decode_block_cpu(Tensor x, Tensor? ln1_weight, Tensor? ln1_bias, Tensor qkv, Tensor? qkv_bias, "
        "Tensor out_proj, Tensor? out_bias, Tensor? ln2_weight, Tensor? ln2_bias, Tensor fc1, Tensor? fc1_bias, "
        "Tensor fc2, Tensor? fc2_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor seq_lens, int heads, int ffn, float eps, str activation, str isa) -> Tensor");
  // CPU only: one T5 decoder layer at decode (csrc/t5_decode_block_cpu.cpp). x [N, d_model] float32: the
  // residual stream; delta: the previous layer's output, added to it first (None for the first layer);
  // the weights packed float32, no biases (qkv [3 inner, d], o and o_cross [d, inner], q [inner, d], wi0
  // and wi1 (gated; None otherwise) [d_ff, d], wo [d, d_ff]); rel_bias [H, max_len] for self-attention;
  // activation "relu", "gelu" or "gelu_tanh". Returns (the layer's output, the residual stream).
  m.def("t5_decode_block_cpu(Tensor x, Tensor? delta, Tensor ln_sa, Tensor qkv, Tensor o, Tensor ln_ca, Tensor q, "
        "Tensor o_cross, Tensor ln_ff, Tensor wi0, Tensor? wi1, Tensor wo, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor rel_bias, Tensor cross_k, Tensor cross_v, "
        "Tensor cross_block_tables, Tensor cross_seq_lens, int heads, int d_kv, int d_ff, float eps, str activation, "
        "str isa) -> (Tensor, Tensor)");
}
