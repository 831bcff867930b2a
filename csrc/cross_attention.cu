// CUDA kernels of blip2_fast::cross_attention_fwd (spec: reference.cross_attention_ref): the Q-Former's
// 32 queries attend over 257 image patches, per (batch, head).
//
// Two kernels, one block per (batch, head, 32-query tile):
//
// cross_attention_mma_kernel (fp16 / bf16 with 16-byte aligned rows, D a multiple of 8, D <= 128):
// two warps, each owning 16 queries, on the tensor cores (mma.sync m16n8k16, fp32 accumulation).
// Keys stream through shared memory in tiles of 64, double-buffered with cp.async: tile t+1 is in
// flight while tile t is multiplied. S = Q Kᵀ comes out in the mma accumulator layout, which is
// also the layout of the A operand of P V, so the probabilities never leave registers; an online
// softmax (log2 domain, row max and sum over the 4 lanes that share a row) folds each tile in. At
// the Q-Former's shape the work is ~32 FLOP per byte of K and V: on the tensor cores the kernel is
// bound by reading K and V.
//
// cross_attention_kernel (everything else: fp32, strided or misaligned rows, odd D): 128 threads,
// everything in shared memory as fp32, S = Q Kᵀ and O += P V as 4x4 register tiles of FMAs.
//
// Needs only the CUDA headers and cross_attention.h, so `nvcc -c` compiles it without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cross_attention.h"

namespace blip2_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kQT = 32;            // queries per block
constexpr int kKT = 64;            // keys per tile
constexpr int kPStride = kQT + 4;  // row stride of the P tile; +4 spreads its float4 stores over banks
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// kN elements of T make one 16-byte load.
template <typename T>
struct Chunk {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
};

// Elements d0 .. d0 + kN - 1 of one row (element stride sd) as fp32; elements at d >= D read as 0.
// `vec`: the row is 16-byte aligned with sd == 1 and D % kN == 0, so a chunk is all in or all out.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t sd, int d0, int D, bool vec,
                                           float (&x)[Chunk<T>::kN]) {
  constexpr int N = Chunk<T>::kN;
  if (vec) {
    if (d0 < D) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + d0);
      T e[N];
      memcpy(static_cast<void*>(e), &raw, sizeof(raw));
#pragma unroll
      for (int i = 0; i < N; ++i) x[i] = to_float(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) x[i] = 0.0f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = d0 + i < D ? to_float(row[static_cast<int64_t>(d0 + i) * sd]) : 0.0f;
  }
}

// Sum / max over the 16 lanes of a half warp (the threads of one query group).
__device__ __forceinline__ float half_warp_sum(float x) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
__device__ __forceinline__ float half_warp_max(float x) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

template <int DM>
constexpr int smem_floats() {
  return DM * kQT + DM * kKT + kKT * DM + kKT * kPStride;
}

// Grid: one block per (batch, head, query tile), blockIdx.x = (b * H + h) * n_qtiles + query tile.
// Thread t owns queries 4 * (t / 16) .. + 3 of the tile; for the scores it owns keys 4 * (t % 16) .. + 3
// of a key tile, for the output the head dims listed at `o` below.
//   p:        the tensors, shapes and strides (cross_attention.h)
//   n_qtiles: ceil(Nq / kQT)
//   q_vec, k_vec, v_vec: the tensor can be read in 16-byte chunks (see load_chunk)
//   DM:       the head dim rounded up to 32, 64 or 128; dims >= D are zero in shared memory
template <typename T, int DM>
__global__ void __launch_bounds__(kThreads)
    cross_attention_kernel(const CrossAttnParams p, int n_qtiles, bool q_vec, bool k_vec, bool v_vec) {
  constexpr int N = Chunk<T>::kN;
  constexpr int CPR = DM / N;                 // 16-byte chunks per padded row
  constexpr int VEC = DM >= 64 ? 4 : 2;       // head dims per shared-memory read of V
  constexpr int NCH = DM / (16 * VEC);        // such reads per key
  static_assert(DM % N == 0 && DM % (16 * VEC) == 0, "DM must be 32, 64 or 128");

  extern __shared__ float4 smem4[];
  float* Qt = reinterpret_cast<float*>(smem4);  // [DM][kQT] queries, transposed, scaled by scale * log2(e)
  float* Kt = Qt + DM * kQT;                      // [DM][kKT] key tile, transposed
  float* Vs = Kt + DM * kKT;                      // [kKT][DM] value tile
  float* Pt = Vs + kKT * DM;                      // [kKT][kPStride] probabilities, transposed

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / n_qtiles;
  const int q0 = static_cast<int>(blockIdx.x % n_qtiles) * kQT;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int Nq = static_cast<int>(p.Nq), Nk = static_cast<int>(p.Nk), D = static_cast<int>(p.D);
  const T* qbh = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* kbh = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* vbh = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const uint8_t* mrow = p.mask ? p.mask + b * p.mask_stride[0] : nullptr;

  // Rows vary fastest over threads: the transposed stores then hit consecutive banks.
  const float qscale = p.scale * kLog2e;
  for (int idx = tid; idx < kQT * CPR; idx += kThreads) {
    const int i = idx % kQT, c = idx / kQT;
    float x[N];
    load_chunk<T>(qbh + static_cast<int64_t>(q0 + i) * p.q_stride[2], p.q_stride[3], c * N,
                  q0 + i < Nq ? D : 0, q_vec, x);
#pragma unroll
    for (int e = 0; e < N; ++e) Qt[(c * N + e) * kQT + i] = x[e] * qscale;
  }

  const int qg = tid / 16, kg = tid % 16;
  // o[a][c * VEC + e]: query 4 * qg + a, head dim c * 16 * VEC + kg * VEC + e (a float4/float2 per read).
  float o[4][NCH * VEC];
  float m[4], l[4];  // running max (log2 domain) and sum of 2^(s - m)
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    m[a] = -INFINITY;
    l[a] = 0.0f;
#pragma unroll
    for (int x = 0; x < NCH * VEC; ++x) o[a][x] = 0.0f;
  }

  for (int k0 = 0; k0 < Nk; k0 += kKT) {
    __syncthreads();  // the previous tile's Kt, Vs, Pt are consumed (first pass: Qt is written)
    for (int idx = tid; idx < kKT * CPR; idx += kThreads) {
      const int j = idx % kKT, c = idx / kKT;
      float x[N];
      load_chunk<T>(kbh + static_cast<int64_t>(k0 + j) * p.k_stride[2], p.k_stride[3], c * N,
                    k0 + j < Nk ? D : 0, k_vec, x);
#pragma unroll
      for (int e = 0; e < N; ++e) Kt[(c * N + e) * kKT + j] = x[e];
    }
    for (int idx = tid; idx < kKT * CPR; idx += kThreads) {
      const int c = idx % CPR, j = idx / CPR;  // chunks fastest: coalesced rows
      float x[N];
      load_chunk<T>(vbh + static_cast<int64_t>(k0 + j) * p.v_stride[2], p.v_stride[3], c * N,
                    k0 + j < Nk ? D : 0, v_vec, x);
#pragma unroll
      for (int e = 0; e < N; ++e) Vs[j * DM + c * N + e] = x[e];
    }
    __syncthreads();

    float s[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) s[a][jj] = 0.0f;
#pragma unroll 16
    for (int d = 0; d < DM; ++d) {
      const float4 qv = *reinterpret_cast<const float4*>(Qt + d * kQT + qg * 4);
      const float4 kv = *reinterpret_cast<const float4*>(Kt + d * kKT + kg * 4);
      const float qa[4] = {qv.x, qv.y, qv.z, qv.w}, ka[4] = {kv.x, kv.y, kv.z, kv.w};
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) s[a][jj] = fmaf(qa[a], ka[jj], s[a][jj]);
    }

#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int key = k0 + kg * 4 + jj;
      const bool keep = key < Nk && (mrow == nullptr || mrow[static_cast<int64_t>(key) * p.mask_stride[1]] != 0);
#pragma unroll
      for (int a = 0; a < 4; ++a) s[a][jj] = keep ? s[a][jj] : -INFINITY;
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const float mx = half_warp_max(fmaxf(fmaxf(s[a][0], s[a][1]), fmaxf(s[a][2], s[a][3])));
      const float m_new = fmaxf(m[a], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: every 2^(s - m) is 0
      const float alpha = exp2f(m[a] - m_use);
      float sum = 0.0f;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        s[a][jj] = exp2f(s[a][jj] - m_use);
        sum += s[a][jj];
      }
      l[a] = l[a] * alpha + half_warp_sum(sum);
      m[a] = m_new;
#pragma unroll
      for (int x = 0; x < NCH * VEC; ++x) o[a][x] *= alpha;
    }
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
      *reinterpret_cast<float4*>(Pt + (kg * 4 + jj) * kPStride + qg * 4) = make_float4(s[0][jj], s[1][jj], s[2][jj], s[3][jj]);
    __syncthreads();

    const int kn = Nk - k0 < kKT ? Nk - k0 : kKT;
#pragma unroll 4
    for (int j = 0; j < kn; ++j) {
      const float4 pv = *reinterpret_cast<const float4*>(Pt + j * kPStride + qg * 4);
      const float pa[4] = {pv.x, pv.y, pv.z, pv.w};
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        float va[VEC];
        const float* vrow = Vs + j * DM + c * 16 * VEC + kg * VEC;
        if constexpr (VEC == 4) {
          const float4 vv = *reinterpret_cast<const float4*>(vrow);
          va[0] = vv.x, va[1] = vv.y, va[2] = vv.z, va[3] = vv.w;
        } else {
          const float2 vv = *reinterpret_cast<const float2*>(vrow);
          va[0] = vv.x, va[1] = vv.y;
        }
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[a][c * VEC + e] = fmaf(pa[a], va[e], o[a][c * VEC + e]);
      }
    }
  }

  T* obh = static_cast<T*>(p.out) + (b * p.H + h) * p.Nq * p.D;  // out is contiguous [B, H, Nq, D]
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = q0 + qg * 4 + a;
    if (i >= Nq) continue;
    const float inv = l[a] > 0.0f ? 1.0f / l[a] : 0.0f;  // l == 0: every key masked -> zeros, not NaN
#pragma unroll
    for (int c = 0; c < NCH; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int d = c * 16 * VEC + kg * VEC + e;
        if (d < D) obh[static_cast<int64_t>(i) * D + d] = from_float<T>(o[a][c * VEC + e] * inv);
      }
  }
}

// 16-byte chunks are safe: unit stride along D, every row start 16-byte aligned, no chunk straddling D.
bool can_vectorize(const void* ptr, const int64_t (&stride)[4], const CrossAttnParams& p, int64_t elem) {
  const int64_t sizes[3] = {p.B, p.H, -1};
  if (stride[3] != 1 || reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || (p.D * elem) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (sizes[i] != 1 && (stride[i] * elem) % 16 != 0) return false;
  return true;
}

// ---------------------------------------------------------------------- tensor-core kernel (fp16 / bf16)

// mma.sync m16n8k16 (fp32 accumulation) and cp.async, sm_80+. The CPU emulation in
// tests/test_cross_attention.py supplies its own versions of these four (emu::), written from the PTX
// manual's fragment layouts, so the kernel's use of the layouts is checked without a GPU.
#ifndef BLIP2_FAST_CUDA_EMULATION
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// 16 bytes global -> shared, asynchronously; the bytes past src_bytes (0 or 16) are zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {  // until at most N of this thread's groups are in flight
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#else
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { emu::mma_16816<T>(d, a, b); }
inline void cp_async_16(void* smem, const void* gmem, int src_bytes) { emu::cp_async_16(smem, gmem, src_bytes); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() { emu::cp_async_wait(N); }
#endif

constexpr int kMmaThreads = 64;  // two warps, 16 queries each
constexpr int kMmaQT = 32;       // queries per block
constexpr int kMmaKT = 64;       // keys per tile

// Row stride of the shared-memory tiles in 16-bit elements: D padded by 8 (16 bytes) so that the
// fragment loads of a warp fall in distinct banks (rows 4 words apart modulo 32), and every row
// starts 16-byte aligned for cp.async.
template <int DM>
__host__ __device__ constexpr int mma_ld() { return DM + 8; }

template <int DM>
constexpr size_t mma_smem_bytes() {
  return (static_cast<size_t>(kMmaQT) + 4 * kMmaKT) * mma_ld<DM>() * sizeof(uint16_t) + 2 * kMmaKT * sizeof(float);
}

__device__ __forceinline__ uint32_t pack_raw(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Two floats as the 16-bit pair (lo, hi) of one mma operand register.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t a, b;
  memcpy(&a, static_cast<const void*>(&l), sizeof(a));
  memcpy(&b, static_cast<const void*>(&h), sizeof(b));
  return pack_raw(a, b);
}

__device__ __forceinline__ uint32_t ld32(const uint16_t* p) {
  uint32_t x;
  memcpy(&x, p, sizeof(x));
  return x;
}

// Grid: one block of kMmaThreads per (batch, head, query tile), blockIdx.x = (b * H + h) * n_qtiles + tile.
// Needs 16-bit T, unit stride along D, D % 8 == 0, 16-byte aligned rows (can_vectorize), D <= DM.
// Warp w owns queries 16 w .. 16 w + 15 of the tile; lane = 4 g + tq holds, in the mma layouts, rows
// g and g + 8 of its warp's 16 and columns 2 tq, 2 tq + 1 of every 8-wide n-tile.
template <typename T, int DM>
__global__ void __launch_bounds__(kMmaThreads)
    cross_attention_mma_kernel(const CrossAttnParams p, int n_qtiles) {
  constexpr int LD = mma_ld<DM>();
  constexpr int CPR = DM / 8;  // 16-byte chunks per padded row
  constexpr int NT = kMmaKT / 8;  // n-tiles of the score tile
  extern __shared__ float4 smem4[];
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem4);  // [kMmaQT][LD]
  uint16_t* Ks = Qs + kMmaQT * LD;                     // [2][kMmaKT][LD], double-buffered
  uint16_t* Vs = Ks + 2 * kMmaKT * LD;                 // [2][kMmaKT][LD]
  float* Mb = reinterpret_cast<float*>(Vs + 2 * kMmaKT * LD);  // [2][kMmaKT]: 0 = visible key, -inf = not

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / n_qtiles;
  const int q0 = static_cast<int>(blockIdx.x % n_qtiles) * kMmaQT;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int Nq = static_cast<int>(p.Nq), Nk = static_cast<int>(p.Nk), D = static_cast<int>(p.D);
  const T* qbh = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* kbh = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* vbh = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const uint8_t* mrow = p.mask ? p.mask + b * p.mask_stride[0] : nullptr;

  // The query tile; rows past Nq and chunks past D are zero-filled (and never stored).
  for (int idx = tid; idx < kMmaQT * CPR; idx += kMmaThreads) {
    const int i = idx / CPR, c = idx % CPR;
    const bool in = q0 + i < Nq && c * 8 < D;
    cp_async_16(Qs + i * LD + c * 8, in ? qbh + static_cast<int64_t>(q0 + i) * p.q_stride[2] + c * 8 : qbh, in ? 16 : 0);
  }
  // Key tile t into buffer s: keys past Nk are zero-filled (and masked by Mb), so nothing past the
  // tensors is read.
  auto load_tile = [&](int t, int s) {
    const int k0 = t * kMmaKT;
    for (int idx = tid; idx < kMmaKT * CPR; idx += kMmaThreads) {
      const int j = idx / CPR, c = idx % CPR;
      const int key = k0 + j;
      const bool in = key < Nk && c * 8 < D;
      const int64_t kr = static_cast<int64_t>(key) * p.k_stride[2] + c * 8, vr = static_cast<int64_t>(key) * p.v_stride[2] + c * 8;
      cp_async_16(Ks + (s * kMmaKT + j) * LD + c * 8, in ? kbh + kr : kbh, in ? 16 : 0);
      cp_async_16(Vs + (s * kMmaKT + j) * LD + c * 8, in ? vbh + vr : vbh, in ? 16 : 0);
    }
    for (int j = tid; j < kMmaKT; j += kMmaThreads) {
      const int key = k0 + j;
      const bool keep = key < Nk && (mrow == nullptr || mrow[static_cast<int64_t>(key) * p.mask_stride[1]] != 0);
      Mb[s * kMmaKT + j] = keep ? 0.0f : -INFINITY;
    }
  };

  const int warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const float qscale = p.scale * kLog2e;
  uint32_t qa[DM / 16][4];  // the warp's 16 queries as mma A operands, one per 16-dim step
  float o[DM / 8][4];       // its output rows g, g + 8 over head dims 8 jd + 2 tq (+1)
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g, g + 8: running max (log2), sum
#pragma unroll
  for (int jd = 0; jd < DM / 8; ++jd)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[jd][e] = 0.0f;

  const int n_tiles = (Nk + kMmaKT - 1) / kMmaKT;
  load_tile(0, 0);
  cp_async_commit();  // group 0: the query tile and key tile 0
  for (int t = 0; t < n_tiles; ++t) {
    const int s = t & 1;
    if (t + 1 < n_tiles) {
      load_tile(t + 1, s ^ 1);  // in flight while this tile is multiplied (its buffer was freed below)
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile t (and, first, the queries) landed for every thread
    if (t == 0) {
      const uint16_t* qr = Qs + (warp * 16 + g) * LD + tq * 2;
#pragma unroll
      for (int kk = 0; kk < DM / 16; ++kk) {
        qa[kk][0] = ld32(qr + kk * 16);
        qa[kk][1] = ld32(qr + 8 * LD + kk * 16);
        qa[kk][2] = ld32(qr + kk * 16 + 8);
        qa[kk][3] = ld32(qr + 8 * LD + kk * 16 + 8);
      }
    }
    const uint16_t* kt = Ks + s * kMmaKT * LD;
    const uint16_t* vt = Vs + s * kMmaKT * LD;
    const float* mb = Mb + s * kMmaKT;

    float sc[NT][4];  // S = Q Kᵀ: n-tile j holds keys 8 j + 2 tq (+1) of rows g, g + 8
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] = 0.0f;
      const uint16_t* kr = kt + (8 * j + g) * LD + tq * 2;
#pragma unroll
      for (int kk = 0; kk < DM / 16; ++kk) {
        const uint32_t kb[2] = {ld32(kr + kk * 16), ld32(kr + kk * 16 + 8)};
        mma_16816<T>(sc[j], qa[kk], kb);
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[j][e] = sc[j][e] * qscale + mb[8 * j + tq * 2 + (e & 1)];
        mx[e >> 1] = fmaxf(mx[e >> 1], sc[j][e]);
      }
    float mu[2], alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));  // the 4 lanes of a row
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      mu[r] = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: every 2^(s - m) is 0
      alpha[r] = exp2f(m[r] - mu[r]);
      m[r] = m_new;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[j][e] = exp2f(sc[j][e] - mu[e >> 1]);
        sum[e >> 1] += sc[j][e];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
      l[r] = l[r] * alpha[r] + sum[r];
    }
#pragma unroll
    for (int jd = 0; jd < DM / 8; ++jd)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[jd][e] *= alpha[e >> 1];

    // O += P V: the accumulators of n-tiles 2 kk, 2 kk + 1 are the A operand of keys 16 kk .. + 15.
#pragma unroll
    for (int kk = 0; kk < kMmaKT / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]), pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                              pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
      const uint16_t* vr = vt + (16 * kk + tq * 2) * LD + g;
#pragma unroll
      for (int jd = 0; jd < DM / 8; ++jd) {
        const uint16_t* vc = vr + jd * 8;  // V[key][8 jd + g] for keys 16 kk + 2 tq, +1, +8, +9
        const uint32_t vb[2] = {pack_raw(vc[0], vc[LD]), pack_raw(vc[8 * LD], vc[9 * LD])};
        mma_16816<T>(o[jd], pa, vb);
      }
    }
    __syncthreads();  // every warp is done with buffer s before the next iteration refills it
  }

  T* obh = static_cast<T*>(p.out) + (b * p.H + h) * p.Nq * p.D;  // out is contiguous [B, H, Nq, D]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + warp * 16 + g + 8 * r;
    if (i >= Nq) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // l == 0: every key masked -> zeros, not NaN
#pragma unroll
    for (int jd = 0; jd < DM / 8; ++jd) {
      const int d = jd * 8 + tq * 2;  // D % 8 == 0: d and d + 1 are both in or both out
      if (d < D) {
        const uint32_t v2 = pack2<T>(o[jd][2 * r] * inv, o[jd][2 * r + 1] * inv);
        memcpy(static_cast<void*>(obh + static_cast<int64_t>(i) * D + d), &v2, sizeof(v2));
      }
    }
  }
}

// The tensor-core kernel can take this call: 16-bit dtype, and q, k, v each readable in 16-byte chunks.
bool mma_ok(const CrossAttnParams& p) {
  if (p.dtype == CrossAttnDtype::kFloat32 || p.D % 8 != 0 || p.D > 128) return false;
  return can_vectorize(p.q, p.q_stride, p, 2) && can_vectorize(p.k, p.k_stride, p, 2) &&
         can_vectorize(p.v, p.v_stride, p, 2);
}

#ifndef BLIP2_FAST_CUDA_EMULATION  // tests/test_cross_attention.py runs the code above on CPU threads

template <typename T, int DM>
cudaError_t launch(const CrossAttnParams& p, cudaStream_t stream) {
  const int64_t n_qtiles = (p.Nq + kQT - 1) / kQT;
  const int64_t blocks = n_qtiles * p.B * p.H;
  if (blocks > 0x7fffffff || p.Nk > 0x7fffffff || p.Nq > 0x7fffffff) return cudaErrorInvalidConfiguration;
  constexpr size_t smem = smem_floats<DM>() * sizeof(float);
  const auto kernel = cross_attention_kernel<T, DM>;
  if constexpr (smem > 48 * 1024) {
    // Opt in to more than 48 KiB; cheap, and per device, so done on every launch.
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t elem = sizeof(T);
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      p, static_cast<int>(n_qtiles), can_vectorize(p.q, p.q_stride, p, elem), can_vectorize(p.k, p.k_stride, p, elem),
      can_vectorize(p.v, p.v_stride, p, elem));
  return cudaGetLastError();
}

template <typename T, int DM>
cudaError_t launch_mma(const CrossAttnParams& p, cudaStream_t stream) {
  const int64_t n_qtiles = (p.Nq + kMmaQT - 1) / kMmaQT;
  const int64_t blocks = n_qtiles * p.B * p.H;
  if (blocks > 0x7fffffff || p.Nk > 0x7fffffff || p.Nq > 0x7fffffff) return cudaErrorInvalidConfiguration;
  constexpr size_t smem = mma_smem_bytes<DM>();
  const auto kernel = cross_attention_mma_kernel<T, DM>;
  if constexpr (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), kMmaThreads, smem, stream>>>(p, static_cast<int>(n_qtiles));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const CrossAttnParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (mma_ok(p)) {
      if (p.D <= 32) return launch_mma<T, 32>(p, stream);
      if (p.D <= 64) return launch_mma<T, 64>(p, stream);
      return launch_mma<T, 128>(p, stream);
    }
  }
  if (p.D <= 32) return launch<T, 32>(p, stream);
  if (p.D <= 64) return launch<T, 64>(p, stream);
  if (p.D <= 128) return launch<T, 128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t cross_attention_cuda_launch(const CrossAttnParams& p, cudaStream_t stream) {
  if (p.B * p.H * p.Nq * p.D == 0) return cudaSuccess;
  switch (p.dtype) {
    case CrossAttnDtype::kFloat32: return launch_dtype<float>(p, stream);
    case CrossAttnDtype::kFloat16: return launch_dtype<__half>(p, stream);
    case CrossAttnDtype::kBFloat16: return launch_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

#else

}  // namespace

#endif  // BLIP2_FAST_CUDA_EMULATION

}  // namespace blip2_fast
