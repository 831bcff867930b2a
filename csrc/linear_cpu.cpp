// CPU kernel of blip2_fast::linear_cpu (schema in ops.cpp, spec: reference.linear_ref): y = act(x Wᵀ + b)
// for the few rows of a decode step, streaming a prepacked weight once.
//
// Why: MKL's fp32 GEMM with 1-32 rows reads the weight at 5-10 GB/s on 2 EPYC cores (issue 16), a
// third of what the memory delivers, and a decode step is nothing but such GEMMs. Here the weight is
// packed once (linear_pack_cpu) into column blocks of kNB = 32 outputs, each block [K][32] contiguous,
// so one block is one sequential stream; threads take contiguous runs of blocks (at::parallel_for, in
// torch's pool), each row tile keeps its 32 x MT sums in registers over a K chunk, and the chunk
// (<= 16 KB of weight) is reused from L1 by the next row tile. The epilogue adds the bias and applies
// the activation while the block's sums are still in L1.
//
// Weights: fp32 [nb][K][32], or bf16 [nb][ceil(K/2)][32][2] (k pairs, the layout vdpbf16ps multiplies;
// an odd K's last pair and the columns past N are zero). The bf16 kernel computes bf16(x) · bf16(W)
// with every product exact in fp32 and fp32 accumulation, the result rounded once to the output dtype.
// ISA: the widest of AVX-512 (+ avx512_bf16 for the bf16 weights), AVX2+FMA and a portable scalar
// kernel that the CPU has and the `isa` argument allows (linear_cpu_isa resolves the name).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "cpu_ops.h"
#include "cpu_vec.h"
#include "linear_cpu_kernels.h"

namespace blip2_fast {
namespace {

using linear::kNB;
using linear::TileFn;

// ---------------------------------------------------------------- ISA --------------------------------

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "avx512_bf16"};

int detect_isa() {
#if BLIP2_FAST_X86
  __builtin_cpu_init();  // libgcc's cpuid: these also check that the OS saves the vector state (XCR0)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("fma");
  if (avx512) return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

int best_isa() {
  static const int isa = detect_isa();
  return isa;
}

// "auto" -> the best this CPU has; a name caps it there (tests force each lower branch).
int resolve_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (int i = 0; i <= kAvx512Bf16; ++i)
    if (name == kIsaNames[i]) return std::min(i, best_isa());
  TORCH_CHECK(false, "linear: isa must be 'auto', 'scalar', 'avx2', 'avx512' or 'avx512_bf16', got '", name, "'");
}

std::string linear_cpu_isa(const std::string& name) { return kIsaNames[resolve_isa(name)]; }

// ---------------------------------------------------------------- packing -----------------------------

uint16_t bf16_bits(float f) { return c10::BFloat16(f).x; }  // round to nearest even, as Tensor.bfloat16()

at::Tensor linear_pack_cpu(const at::Tensor& weight, at::ScalarType dtype) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) >= 1,
              "linear_pack: weight must have shape [N, K] with N, K >= 1, got ", weight.sizes());
  TORCH_CHECK(weight.is_floating_point(), "linear_pack: weight must be a float tensor, got ", weight.scalar_type());
  TORCH_CHECK(weight.device().is_cpu(), "linear_pack: weight must be on the CPU, got ", weight.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "linear_pack: dtype must be float32 or bfloat16, got ",
              dtype);
  const int64_t N = weight.size(0), K = weight.size(1), nb = (N + kNB - 1) / kNB;
  const at::Tensor w = weight.to(at::kFloat).contiguous();  // once, at load
  const float* wp = w.const_data_ptr<float>();
  if (dtype == at::kFloat) {
    at::Tensor packed = at::empty({nb, K, kNB}, weight.options().dtype(at::kFloat));
    float* dst = packed.mutable_data_ptr<float>();
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t j = 0; j < kNB; ++j) {
          const int64_t n = b * kNB + j;
          for (int64_t k = 0; k < K; ++k) dst[(b * K + k) * kNB + j] = n < N ? wp[n * K + k] : 0.0f;
        }
    });
    return packed;
  }
  const int64_t K2 = (K + 1) / 2;
  at::Tensor packed = at::empty({nb, K2, kNB, 2}, weight.options().dtype(at::kBFloat16));
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.mutable_data_ptr());
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = 0; j < kNB; ++j) {
        const int64_t n = b * kNB + j;
        for (int64_t k = 0; k < 2 * K2; ++k)
          dst[((b * K2 + k / 2) * kNB + j) * 2 + k % 2] = n < N && k < K ? bf16_bits(wp[n * K + k]) : 0;
      }
  });
  return packed;
}

// ---------------------------------------------------------------- epilogue ----------------------------

enum Act : int { kNone = 0, kRelu = 1, kGelu = 2 };

int parse_activation(const std::string& a) {
  if (a == "none") return kNone;
  if (a == "relu") return kRelu;
  if (a == "gelu") return kGelu;
  TORCH_CHECK(false, "linear: activation must be 'none', 'relu' or 'gelu' (exact, erf), got '", a, "'");
}

using vec::horner;
using vec::load16;
using vec::store16;
using vec::v16;
using vec::vi16;

// erf, branch-free over 16 lanes, absolute error < 2^-24 (std::erf does not vectorise). Fitted by least
// squares at 4000 Chebyshev nodes of each piece: erf(z)/z - 1 as a polynomial in z² on [0, 1), erfc in
// z - 1.75 on [1, 2.5) and in z - 3.25 on [2.5, 4); erf(z) rounds to 1 beyond 4. NaN stays NaN in gelu.
BLIP2_FAST_INLINE v16 erf16(const v16& u) {
  static constexpr float kA[] = {0.128379166f, -0.376126289f, 0.112836257f, -0.0268553998f,
                                 0.00519121857f, -0.00080348464f, 7.93349391e-05f};
  static constexpr float kB[] = {0.0133283297f, -0.0527749769f, 0.092356123f, -0.0901579037f,
                                 0.048104696f, -0.00661847135f, -0.00898207072f, 0.00603674585f,
                                 -0.000663912972f, -0.000862275192f, 0.000335376564f};
  static constexpr float kC[] = {4.30271484e-06f, -2.91868146e-05f, 9.48689631e-05f, -0.000195887726f,
                                 0.00028652756f, -0.000313029886f, 0.000263535621f, -0.000173044929f,
                                 8.24522576e-05f, -2.07238663e-05f};
  const vi16 sign = (vi16)u & (int32_t)0x80000000u;
  const v16 z = (v16)((vi16)u & 0x7fffffff);
  const v16 a = z + z * horner(z * z, kA);
  const v16 b = 1.0f - horner(z - 1.75f, kB);
  const v16 c = 1.0f - horner(z - 3.25f, kC);
  const v16 r = z < 1.0f ? a : z < 2.5f ? b : z < 4.0f ? c : v16{} + 1.0f;
  return (v16)((vi16)r | sign);
}

BLIP2_FAST_INLINE v16 activate(const v16& y, int act) {
  if (act == kRelu) return y < 0.0f ? v16{} : y;  // NaN stays NaN, as torch.relu
  if (act == kGelu) return 0.5f * y * (1.0f + erf16(y * 0.70710678118654752f));
  return y;
}

// rows x 32 sums of one block -> act(sums + bias) into the first `cols` columns of each output row
BLIP2_FAST_CLONES void finish_block(const float* acc, int64_t rows, const float* bias, int64_t cols, int act,
                                    void* out, int64_t ldo, bool out_bf16) {
  float b[kNB] = {}, y[kNB];
  if (bias != nullptr) std::memcpy(b, bias, cols * sizeof(float));
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t h = 0; h < kNB; h += 16) store16(y + h, activate(load16(acc + m * kNB + h) + load16(b + h), act));
    if (out_bf16) {
      c10::BFloat16* o = static_cast<c10::BFloat16*>(out) + m * ldo;
      for (int64_t j = 0; j < cols; ++j) o[j] = c10::BFloat16(y[j]);
    } else {
      std::memcpy(static_cast<float*>(out) + m * ldo, y, cols * sizeof(float));
    }
  }
}

// ---------------------------------------------------------------- driver ------------------------------

struct Job {
  int64_t M, N, steps;  // steps: K (fp32) or K pairs (bf16) per block row
  const char* x;        // the rows the tiles read: fp32 x, bf16-rounded fp32 x (2 per pair), or u32 pairs
  int64_t ldx, xstep;   // 4-byte elements per row of x, and per step
  const char* w;        // packed blocks, 4-byte elements: steps x 32 per block
  const float* bias;    // fp32 [N] or nullptr
  int act;
  char* out;
  int64_t ldo;
  bool out_bf16;
  const TileFn* tiles;
  int max_rows, halves;  // AVX2 runs each block as two 16-column halves
  int64_t kc;            // steps per K chunk
};

// Rows go in panels of at most kPanel: a panel's x chunk (kPanel x kc fp32 = 96 KB) stays in L2
// while the thread's blocks stream past it; a decode step (<= 32 rows) is a single panel.
constexpr int64_t kPanel = 192;
// Up to this many rows (a decode step's) the weight streams from memory once, in the first row tile
// of each K chunk (the others find the chunk in L1): the tiles that prefetch it (kernels.h) run.
constexpr int64_t kStreamRows = 32;
// Largest x (floats, 16 MB) copied to a padded stride; a larger one runs from x itself.
constexpr int64_t kMaxPaddedX = int64_t{1} << 22;

void run_blocks(const Job& J, int64_t b0, int64_t b1) {
  const int64_t panel = std::min(J.M, kPanel);
  std::vector<float> acc(panel * kNB);  // this thread's sums of one block and panel, [rows][32]
  const int64_t half = kNB / J.halves;
  for (int64_t p0 = 0; p0 < J.M; p0 += panel) {
    const int64_t rows = std::min(panel, J.M - p0);
    for (int64_t b = b0; b < b1; ++b) {
      const char* wb = J.w + b * J.steps * kNB * 4;
      for (int64_t k0 = 0; k0 < J.steps; k0 += J.kc) {
        const int64_t kc = std::min(J.kc, J.steps - k0);
        for (int64_t m0 = 0; m0 < rows; m0 += J.max_rows) {
          const int mt = static_cast<int>(std::min<int64_t>(J.max_rows, rows - m0));
          for (int h = 0; h < J.halves; ++h)
            J.tiles[mt](J.x + ((p0 + m0) * J.ldx + k0 * J.xstep) * 4, J.ldx, wb + (k0 * kNB + h * half) * 4, kc,
                        acc.data() + m0 * kNB + h * half, k0 > 0);
        }
      }
      const int64_t n0 = b * kNB, cols = std::min(kNB, J.N - n0);
      finish_block(acc.data(), rows, J.bias != nullptr ? J.bias + n0 : nullptr, cols, J.act,
                   J.out + (p0 * J.ldo + n0) * (J.out_bf16 ? 2 : 4), J.ldo, J.out_bf16);
    }
  }
}

// The kernels of one ISA and weight dtype. `xform`: what the tiles read as x.
enum XForm : int { kXF32 = 0, kXPairs = 1, kXRounded = 2 };
struct Kernel {
  const TileFn* tiles;
  int max_rows, halves;
  XForm xform;
  const TileFn* stream_tiles;  // for a weight read once (M <= kStreamRows): software prefetch (kernels.h)
};

using namespace linear;
const TileFn kScalarF32[] = BLIP2_FAST_TILES4(tile_f32_scalar);
const TileFn kScalarBf16[] = BLIP2_FAST_TILES4(tile_bf16_scalar);
#if BLIP2_FAST_X86
const TileFn kAvx2F32[] = BLIP2_FAST_TILES6(tile_f32_avx2);
const TileFn kAvx2F32Stream[] = BLIP2_FAST_TILES6_STREAM(tile_f32_avx2);
const TileFn kAvx2Bf16[] = BLIP2_FAST_TILES4(tile_bf16_avx2);
const TileFn kAvx2Bf16Stream[] = BLIP2_FAST_TILES4_STREAM(tile_bf16_avx2);
const TileFn kAvx512F32[] = BLIP2_FAST_TILES12(tile_f32_avx512);
const TileFn kAvx512F32Stream[] = BLIP2_FAST_TILES12_STREAM(tile_f32_avx512);
const TileFn kAvx512Bf16Emu[] = BLIP2_FAST_TILES12(tile_bf16_avx512);
const TileFn kAvx512Bf16Native[] = BLIP2_FAST_TILES12(tile_bf16_avx512bf16);
const TileFn kAvx512Bf16NativeStream[] = BLIP2_FAST_TILES12_STREAM(tile_bf16_avx512bf16);
#endif

Kernel pick_kernel(int isa, bool bf16) {
#if BLIP2_FAST_X86
  if (isa >= kAvx512Bf16 && bf16) return {kAvx512Bf16Native, kMaxRowsAvx512, 1, kXPairs, kAvx512Bf16NativeStream};
  if (isa >= kAvx512) return bf16 ? Kernel{kAvx512Bf16Emu, kMaxRowsAvx512, 1, kXRounded, kAvx512Bf16Emu}
                                  : Kernel{kAvx512F32, kMaxRowsAvx512, 1, kXF32, kAvx512F32Stream};
  if (isa >= kAvx2) return bf16 ? Kernel{kAvx2Bf16, kMaxRowsAvx2Bf16, 2, kXRounded, kAvx2Bf16Stream}
                                : Kernel{kAvx2F32, kMaxRowsAvx2, 2, kXF32, kAvx2F32Stream};
#endif
  return bf16 ? Kernel{kScalarBf16, kMaxRowsScalar, 1, kXRounded, kScalarBf16}
              : Kernel{kScalarF32, kMaxRowsScalar, 1, kXF32, kScalarF32};
}

// x [M, K] (fp32 or bf16, row stride ldx) as the bf16 kernels read it: u32 pairs [M][K2] for
// vdpbf16ps, else bf16-rounded fp32 [M][2 * K2]; an odd K's last pair gets a zero partner.
template <typename T>
at::Tensor bf16_rows(const T* x, int64_t M, int64_t K, int64_t ldx, int64_t K2, bool pairs) {
  at::Tensor t = at::empty({M, 2 * K2}, at::TensorOptions().dtype(pairs ? at::kBFloat16 : at::kFloat));
  uint16_t* bits = pairs ? reinterpret_cast<uint16_t*>(t.mutable_data_ptr()) : nullptr;
  uint32_t* wide = pairs ? nullptr : reinterpret_cast<uint32_t*>(t.mutable_data_ptr());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < 2 * K2; ++k) {
      const uint16_t b = k < K ? bf16_bits(static_cast<float>(x[m * ldx + k])) : 0;
      if (pairs)
        bits[m * 2 * K2 + k] = b;
      else
        wide[m * 2 * K2 + k] = static_cast<uint32_t>(b) << 16;  // the bf16 value as an fp32 bit pattern
    }
  return t;
}

}  // namespace

void linear_cpu_out(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                    int64_t out_features, const std::string& activation, const std::string& isa, at::Tensor& out) {
  const bool bf16 = packed.scalar_type() == at::kBFloat16;
  TORCH_CHECK((packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(2) == kNB) ||
                  (bf16 && packed.dim() == 4 && packed.size(2) == kNB && packed.size(3) == 2),
              "linear: packed must come from linear_pack: float32 [nb, K, 32] or bfloat16 [nb, ceil(K/2), 32, 2], "
              "got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(packed.is_contiguous() && packed.device().is_cpu(), "linear: packed must be a contiguous CPU tensor");
  const int64_t nb = packed.size(0), N = out_features;
  TORCH_CHECK(N >= 1 && (N + kNB - 1) / kNB == nb, "linear: out_features = ", N, " does not fit packed ",
              packed.sizes(), " (", nb, " blocks of 32 columns)");
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu(), "linear: x must be a CPU tensor [..., K], got ", x.sizes(),
              " on ", x.device());
  const int64_t K = x.size(-1);
  if (bf16) {
    TORCH_CHECK((K + 1) / 2 == packed.size(1), "linear: x has K = ", K, " but the bf16 packed weight ", packed.sizes(),
                " holds K = ", 2 * packed.size(1) - 1, " or ", 2 * packed.size(1));
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "linear: with bf16 weights x must be float32 or bfloat16, got ", x.scalar_type());
  } else {
    TORCH_CHECK(K == packed.size(1), "linear: x must have shape [..., K] with K = ", packed.size(1),
                " (the packed weight ", packed.sizes(), "), got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "linear: with float32 weights x must be float32, got ",
                x.scalar_type());
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape) && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                  out.device().is_cpu(),
              "linear: out must be a contiguous CPU ", x.scalar_type(), " tensor of shape ", at::IntArrayRef(shape),
              ", got ", out.scalar_type(), " ", out.sizes());
  at::Tensor b32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_floating_point() && bias->device().is_cpu(),
                "linear: bias must be a float CPU tensor of shape [N = ", N, "], got ", bias->scalar_type(), " ",
                bias->sizes());
    b32 = bias->to(at::kFloat).contiguous();
  }
  const int act = parse_activation(activation);
  const Kernel kern = pick_kernel(resolve_isa(isa), bf16);
  at::assert_no_overlap(out, x);
  const int64_t M = x.numel() / K;
  if (M == 0) return;
  at::Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();

  Job J{};
  J.M = M, J.N = N, J.steps = packed.size(1);
  at::Tensor xs;  // bf16 weights: x as those tiles read it, kept alive for the call
  if (bf16) {
    const bool pairs = kern.xform == kXPairs;
    xs = x2.scalar_type() == at::kFloat
             ? bf16_rows(x2.const_data_ptr<float>(), M, K, x2.stride(0), J.steps, pairs)
             : bf16_rows(x2.const_data_ptr<c10::BFloat16>(), M, K, x2.stride(0), J.steps, pairs);
    J.ldx = pairs ? J.steps : 2 * J.steps;
    J.xstep = pairs ? 1 : 2;
    J.x = static_cast<const char*>(xs.const_data_ptr());
  } else if (M > 1 && (x2.stride(0) * 4) % 4096 == 0 && M * (K + 16) <= kMaxPaddedX) {
    // rows a multiple of 4 KB apart (K = 1024, 2048, 5120, 10240: most real widths) all map to the
    // same L1 sets, so a tile's x chunk evicts itself (~10% at [264, 2048]); a copy with one cache
    // line of padding per row costs one pass over x, which every column block then rereads. It goes
    // into this thread's scratch, kept between calls: a fresh buffer's page faults cost more than the copy.
    static thread_local std::vector<float> scratch;
    if (scratch.size() < static_cast<size_t>(M * (K + 16))) scratch.resize(M * (K + 16));
    const float* src = x2.const_data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) std::memcpy(scratch.data() + m * (K + 16), src + m * x2.stride(0), K * 4);
    J.x = reinterpret_cast<const char*>(scratch.data());
    J.ldx = K + 16, J.xstep = 1;
  } else {
    J.x = static_cast<const char*>(x2.const_data_ptr());
    J.ldx = x2.stride(0), J.xstep = 1;
  }
  J.w = static_cast<const char*>(packed.const_data_ptr());
  J.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  J.act = act;
  J.out = static_cast<char*>(out.mutable_data_ptr());
  J.ldo = N, J.out_bf16 = out.scalar_type() == at::kBFloat16;
  // a decode step's rows: the weight streams past once, prefetched where that pays;
  // BLIP2_FAST_LINEAR_PREFETCH=0 turns that off (read per call: a diagnostic, and the A/B of it)
  const char* pf = std::getenv("BLIP2_FAST_LINEAR_PREFETCH");
  J.tiles = M <= kStreamRows && !(pf != nullptr && pf[0] == '0') ? kern.stream_tiles : kern.tiles;
  J.max_rows = kern.max_rows, J.halves = kern.halves;
  // K chunk: 16 KB of the block's weight, reused from L1 by each row tile; with a single row tile
  // (M <= max_rows) the chunk only bounds how long the sums stay in registers
  J.kc = 128;
  // at least 64 KB of weight per task: smaller ones cost more to hand out than to run
  const int64_t grain = std::max<int64_t>(1, 65536 / (J.steps * kNB * 4));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) { run_blocks(J, b0, b1); });
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                      int64_t out_features, const std::string& activation, const std::string& isa) {
  TORCH_CHECK(x.dim() >= 1, "linear: x must have shape [..., K], got a 0-d tensor");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, x.options());
  linear_cpu_out(x, packed, bias, out_features, activation, isa, out);
  return out;
}

namespace {

void linear_cpu_out_op(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                       int64_t out_features, const std::string& activation, const std::string& isa, at::Tensor out) {
  linear_cpu_out(x, packed, bias, out_features, activation, isa, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(blip2_fast, CPU, m) {
  m.impl("linear_pack_cpu", &linear_pack_cpu);
  m.impl("linear_cpu", &linear_cpu);
  m.impl("linear_cpu_out", &linear_cpu_out_op);
}

// No tensor arguments: the dispatcher runs an op like this through its CompositeExplicitAutograd kernel.
TORCH_LIBRARY_IMPL(blip2_fast, CompositeExplicitAutograd, m) { m.impl("linear_cpu_isa", &linear_cpu_isa); }

}  // namespace blip2_fast
