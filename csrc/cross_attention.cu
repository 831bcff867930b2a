// CUDA kernel of blip2_fast::cross_attention_fwd (spec: reference.cross_attention_ref): the Q-Former's 32
// queries attend over 257 image patches, per (batch, head).
//
// One block of 128 threads per (batch, head, 32-query tile): at the Q-Former shape that is one block
// per (batch, head), and the whole query tile stays in shared memory while keys stream through in
// tiles of 64. Everything in shared memory is fp32 (converted once on load), and so is the
// arithmetic: S = Q Kᵀ and O += P V are 4x4 register tiles fed by float4 reads; the online softmax's
// row max and sum reduce over the 16 lanes that share a query group with shuffles. Plain FMA, no
// tensor cores: at Nq = 32, D = 64 the kernel is bound by reading K and V, not by math.
//
// Needs only the CUDA headers and cross_attention.h, so `nvcc -c` compiles it without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>

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

template <typename T>
cudaError_t launch_dtype(const CrossAttnParams& p, cudaStream_t stream) {
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
