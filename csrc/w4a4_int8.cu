// SVDQuant W4A4 linear for the INT8 tensor-core path (sm_80 and later; on sm_90 the fallback of the
// wgmma path, w4a4_sm90a.cu, whose kernel A is the one below with Lane16E4M3Layout).
//
//   y[m,n] = sum_g (sum_{k in g} qx[m,k] * qw[n,k]) * sx[m,g] * sw[g,n]    int32 per group, fp32 sum
//          + sum_r lora_act[m,r] * lora_up[n,r]                            low-rank branch, fp32
//          + bias[n]
//
// Two kernels (DESIGN.md §2, §4):
//   A  quantize_act_lora_down_kernel   one read of x: smooth, per-row 64-group scales, 4-bit codes,
//                                      and lora_act = x . lora_down^T (bf16/fp16 tensor cores, fp32
//                                      sums; K split across warps and blocks, summed in a fixed order).
//   B  w4a4_gemm_kernel                4-bit codes from memory, sign-extended to int8 in registers,
//                                      multiplied with mma.sync m16n8k32 s8.s8.s32; every 64-wide
//                                      group's int32 sums are rescaled into fp32 accumulators; the
//                                      epilogue adds the low-rank product and the bias, rounds once.
//
// Why INT8 MMA and not the native s4 MMA: on sm_90 the s4 mma.sync is emulated (~45 TOPS against
// ~1200 TOPS for s8, DESIGN.md §5). INT4 codes in [-8, 7] and unsigned codes in [0, 15] are exact
// in int8, and a 64-group's dot product (|sum| <= 64*8*15) is exact in int32, so the group sums
// are bit-identical to the spec's; only the fp32 accumulation order across groups differs.
//
// The GEMM is one template over the MMA flavour (a policy struct: which k of a chunk each lane owns,
// how a lane's words become fragment registers, and the group's MMA chain); kernel A is a template
// over the flavour's layout. The host picks the flavour per GPU (MmaPath in w4a4_int8.h):
//   MmaS8m16n8k32  (below)                              sm_90, sm_120 and newer
//   MmaS4m16n8k64  (w4a4_s4.cuh)                        sm_80, sm_86, sm_89
//   MmaS4m8n8k32   (w4a4_s4.cuh)                        sm_75
//   MmaE2M1S8m16n8k16 (w4a4_nvfp4.cuh; NVFP4 files: 16-wide groups, E2M1 codes)  sm_80 .. sm_90
//   MmaE2M1BlockScaledM16n8k64 (w4a4_nvfp4_bs.cuh; NVFP4 on the block-scaled FP4 MMA)  sm_120
// All but the last give the same group sums, hence the same outputs bit for bit; the block-scaled
// MMA accumulates scaled products in fp32 in the tensor core (w4a4_nvfp4_bs.cuh says what differs).
//
// This file holds no torch headers on purpose: it is compiled once per target arch, and keeping it
// small keeps the all-arch build short. Tensor checks and allocation live in w4a4_ops.cpp.
//
// ------------------------------------------------------------------------------------------------
// Memory layouts: the kernels read the layer's tensors as the checkpoint stores them (docs/format.md),
// so a loaded model holds no second, repacked copy.
//   qweight   uint8 [N, K/2]     two codes per byte, low nibble = even k (signed: two's complement)
//   wscales   [K/group, N]       T (INT4, group 64) or E4M3 bytes (NVFP4, group 16)
//   lora_up   T [N, R], bias T [N] (optional), smooth T [K], lora_down T [R, K]
//   NVFP4: wtscale fp32 scalar (read on the device), wcscales fp32 [N]
// T is the layer's 16-bit dtype, which is also x's and the output's. Kernel A writes the activation
// codes in the same layout as qweight, one row per token:
//   act_packed  uint8 [M_pad, K64/2]    (K64 = K rounded up to 64; zero codes past K and M)
//   act_scales  fp32 [K64/group, M_pad] (group-major: a warp's loads for one group are contiguous)
//   lora_act    fp32 [M_pad, R16]       (rank zero-padded to a multiple of 16)
// M_pad is a multiple of the GEMM's block tile (128), so the GEMM reads activations without bounds
// checks; weight rows past N (the last block column) are clamped to row N-1 and their outputs dropped.
//
// Which k a lane owns. An MMA's dot product over one group does not depend on the order of its k, so
// the fragments may take any permutation of a group's k as long as both operands use the same one.
// Each flavour's Layout picks the one that makes its loads simplest: lane (gid, tid) (lane = 4*gid +
// tid) owns, in each 64-chunk of each of its rows, four runs of 4 consecutive k, run j starting at
// Layout::run_k(j, tid); in memory a run is the 16 bits at byte run_k / 2 of the row's 32-byte chunk.
// A lane's codes of one row are two words: word w = run 2w (bits 0..15) | run 2w+1 (bits 16..31),
// code b of a run in bits 4b - i.e. exactly the bytes in memory when the runs are adjacent
// (Layout::kAdjacentRuns: 4 = one 8-byte access per row and chunk, 2 = two 4-byte, 1 = four 2-byte).
//
// The INT8 flavour's layout, Lane16Layout: lane tid owns k 16tid .. 16tid+15 (one 8-byte access).
// mma.sync.m16n8k32 .s8 register fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32"):
//   A (16x32, row-major)  a0: row gid,   k tid*4+0..3      a1: row gid+8, k tid*4+0..3
//                         a2: row gid,   k 16+tid*4+0..3   a3: row gid+8, k 16+tid*4+0..3
//   B (32x8, "col")       b0: col gid,   k tid*4+0..3      b1: col gid,   k 16+tid*4+0..3
//   C (16x8, int32)       c0,c1: row gid, cols 2*tid, 2*tid+1   c2,c3: row gid+8, same cols
// Each register holds 4 int8 values, byte b = k offset b. A word (8 codes) expands to two registers:
//   low  register, byte b = nibble 2b     ((word     ) & 0x0F0F0F0F)
//   high register, byte b = nibble 2b+1   ((word >> 4) & 0x0F0F0F0F)
// (two ANDs plus a sign extension, no byte shuffling). Word v of a row feeds the group's k32 MMA v:
// a0 / a1 = low registers of rows gid / gid+8, a2 / a3 = their high registers, b0 / b1 = the weight
// row's low / high register; so MMA slot (v, k 4tid+b) holds k 16tid + 8v + 2b and slot (v, k
// 16+4tid+b) holds k 16tid + 8v + 2b + 1, in both operands.
// ------------------------------------------------------------------------------------------------

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "w4a4_int8.h"
#include "w4a4_sm90a.h"

namespace svdq {

// ------------------------------------------------------------------------------------------------
// Small helpers

template <typename T> struct Dtype;
template <> struct Dtype<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ float2 to_float2(uint32_t pair) {  // .x = the lower address
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair));
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo (lower address)
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Dtype<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float2 to_float2(uint32_t pair) {
    return __half22float2(*reinterpret_cast<const __half2*>(&pair));
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

// 4 consecutive 16-bit values -> fp32, from one 8-byte load.
template <typename T>
__device__ __forceinline__ void load4_float(const T* __restrict__ p, float (&v)[4]) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 lo = Dtype<T>::to_float2(raw.x), hi = Dtype<T>::to_float2(raw.y);
  v[0] = lo.x; v[1] = lo.y; v[2] = hi.x; v[3] = hi.y;
}

// A lane's two words of one row's 64-chunk (the layout comment above). chunk = the row's 32 bytes;
// kTail: runs at k >= k_limit are not read and are zero (only NVFP4 K, a multiple of 16, can end
// inside a chunk; each access unit lies inside one 16-group, so a unit is all in range or all out).
template <typename Layout, bool kTail = false>
__device__ __forceinline__ uint2 load_words(const uint8_t* __restrict__ chunk, int tid, int k_limit = 64) {
  auto in = [&](int j) { return !kTail || Layout::run_k(j, tid) < k_limit; };
  if constexpr (Layout::kAdjacentRuns == 4) {
    return in(0) ? __ldg(reinterpret_cast<const uint2*>(chunk + Layout::run_k(0, tid) / 2)) : make_uint2(0u, 0u);
  } else if constexpr (Layout::kAdjacentRuns == 2) {
    uint32_t w[2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
      w[i] = in(2 * i) ? __ldg(reinterpret_cast<const uint32_t*>(chunk + Layout::run_k(2 * i, tid) / 2)) : 0u;
    return make_uint2(w[0], w[1]);
  } else {
    uint32_t r[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      r[j] = in(j) ? __ldg(reinterpret_cast<const unsigned short*>(chunk + Layout::run_k(j, tid) / 2)) : 0u;
    return make_uint2(r[0] | (r[1] << 16), r[2] | (r[3] << 16));
  }
}

template <typename Layout>
__device__ __forceinline__ void store_words(uint8_t* __restrict__ chunk, int tid, uint32_t w0, uint32_t w1) {
  if constexpr (Layout::kAdjacentRuns == 4) {
    *reinterpret_cast<uint2*>(chunk + Layout::run_k(0, tid) / 2) = make_uint2(w0, w1);
  } else if constexpr (Layout::kAdjacentRuns == 2) {
    *reinterpret_cast<uint32_t*>(chunk + Layout::run_k(0, tid) / 2) = w0;
    *reinterpret_cast<uint32_t*>(chunk + Layout::run_k(2, tid) / 2) = w1;
  } else {
    const uint32_t r[4] = {w0 & 0xFFFFu, w0 >> 16, w1 & 0xFFFFu, w1 >> 16};
#pragma unroll
    for (int j = 0; j < 4; ++j)
      *reinterpret_cast<unsigned short*>(chunk + Layout::run_k(j, tid) / 2) = static_cast<unsigned short>(r[j]);
  }
}

// 8 nibbles -> two registers of 4 int8 each (see the layout comment above).
// Signed codes are two's-complement nibbles: a byte v in [0,15] with bit 3 set becomes v | 0xF0.
// (v & 8) * 0x1E = 0xF0 per byte, and no byte carries into the next, so one multiply does all four.
template <bool kUnsigned>
__device__ __forceinline__ void unpack_nibbles_to_s8(uint32_t word, uint32_t& lo, uint32_t& hi) {
  lo = word & 0x0F0F0F0Fu;
  hi = (word >> 4) & 0x0F0F0F0Fu;
  if (!kUnsigned) {
    lo |= (lo & 0x08080808u) * 0x1Eu;
    hi |= (hi & 0x08080808u) * 0x1Eu;
  }
}

// d += A(16x32 s8) * B(32x8 s8), int32 accumulate, on the INT8 tensor cores.
__device__ __forceinline__ void mma_s8_m16n8k32(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  // Never reached: the host selects the INT8 flavour only on sm_80 and newer.
  __trap();
#endif
}

// Lane tid owns k 16tid .. 16tid+15 of every 64-chunk: the INT4 flavours' layout (this one and the
// native s4 ones of w4a4_s4.cuh), one 8-byte access per row and chunk.
struct Lane16Layout {
  static constexpr int kAdjacentRuns = 4;
  static __host__ __device__ __forceinline__ constexpr int run_k(int j, int tid) { return 16 * tid + 4 * j; }
};

// Kernel A for the sm_90a wgmma GEMM (w4a4_sm90a.cu): Lane16Layout's lanes and quantizer (the same codes
// and scales), stored one E4M3 code byte per value in that GEMM's k order, scales in its token order
// (store_e4m3_codes, e4m3_scale_slot).
struct Lane16E4M3Layout : Lane16Layout {};
template <typename Layout>
constexpr bool kE4M3Bytes = std::is_same<Layout, Lane16E4M3Layout>::value;

// A lane's two words of one row's 64-group (Lane16Layout: word v = k 16tid + 8v + i in nibble i) -> the
// wgmma path's bytes. Code q is the E4M3 byte of q * 2^-9 (w4a4_sm90a.cu, top): q >= 0 -> q (unsigned
// codes 0..15 too), signed q < 0 (nibble x >= 8) -> 0x80 | (16 - x) = (x ^ 0x8F) + 1, per byte without
// carries. Position p = 32v + 16h + 4t + b of the row's 64 bytes holds k 16t + 8v + 2b + h: the even
// nibbles of word v (h = 0) go to bytes 32v + 4tid .. +3, the odd ones to 32v + 16 + 4tid .. +3.
template <bool kUnsigned>
__device__ __forceinline__ void store_e4m3_codes(uint8_t* __restrict__ group_row, int tid, const uint32_t (&words)[2]) {
#pragma unroll
  for (int v = 0; v < 2; ++v) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t x = (words[v] >> (4 * h)) & 0x0F0F0F0Fu;
      if (!kUnsigned) {
        const uint32_t s = (x >> 3) & 0x01010101u;
        x = (x ^ (s * 0x8Fu)) + s;
      }
      *reinterpret_cast<uint32_t*>(group_row + 32 * v + 16 * h + 4 * tid) = x;
    }
  }
}

// Where the wgmma path stores token `row`'s scales: inside each 16-token block, token 8h + 2t + e goes to
// slot 4t + 2h + e (so a GEMM lane's four tokens 2tid + e, 8 + 2tid + e are one float4).
__device__ __forceinline__ int e4m3_scale_slot(int row) {
  const int i = row & 15, h = i >> 3, t = (i >> 1) & 3, e = i & 1;
  return (row & ~15) + 4 * t + 2 * h + e;
}

}  // namespace svdq

#include "w4a4_s4.cuh"
#include "w4a4_nvfp4.cuh"
#include "w4a4_nvfp4_bs.cuh"

namespace svdq {

// The INT8 flavour: nibbles expanded to int8 registers, two k32 MMAs per group. Unsigned codes
// [0, 15] are non-negative int8, so s8.s8 serves both activation kinds.
struct MmaS8m16n8k32 {
  using Layout = Lane16Layout;
  static constexpr int kMinBlocksPerSm = 0;  // __launch_bounds__: 0 leaves the register budget to ptxas
  struct AFrag { uint32_t k32[2][4]; };  // the A registers of the group's two k32 MMAs
  struct BFrag { uint32_t k32[2][2]; };  // b0, b1 of each
  template <bool kActUnsigned>
  static __device__ __forceinline__ AFrag a_frag(uint2 row0, uint2 row1) {  // rows gid, gid+8
    AFrag f;
    unpack_nibbles_to_s8<kActUnsigned>(row0.x, f.k32[0][0], f.k32[0][2]);
    unpack_nibbles_to_s8<kActUnsigned>(row1.x, f.k32[0][1], f.k32[0][3]);
    unpack_nibbles_to_s8<kActUnsigned>(row0.y, f.k32[1][0], f.k32[1][2]);
    unpack_nibbles_to_s8<kActUnsigned>(row1.y, f.k32[1][1], f.k32[1][3]);
    return f;
  }
  static __device__ __forceinline__ BFrag b_frag(uint2 col) {  // weights are signed
    BFrag f;
    unpack_nibbles_to_s8<false>(col.x, f.k32[0][0], f.k32[0][1]);
    unpack_nibbles_to_s8<false>(col.y, f.k32[1][0], f.k32[1][1]);
    return f;
  }
  template <bool kActUnsigned>
  static __device__ __forceinline__ void group_dot(int32_t (&sum)[4], const AFrag& a, const BFrag& b) {
    mma_s8_m16n8k32(sum, a.k32[0], b.k32[0][0], b.k32[0][1]);
    mma_s8_m16n8k32(sum, a.k32[1], b.k32[1][0], b.k32[1][1]);
  }
};

// Division without branches, bit-identical to __fdiv_rn. nvcc compiles an IEEE fp32 division (div.rn.f32;
// SASS of sm_75 .. sm_120) to a fast path - y = MUFU.RCP(b) refined by one Newton step, q = a * y, then one
// fma correction q + (a - b q) y - which it takes whenever the check FCHK finds ordinary operands (not
// zero, subnormal, infinite or NaN, exponents away from the ends of the range), and to a call of a slow
// routine otherwise: a branch per division, around which ptxas does not interleave the next division, so
// 64 divisions per 64-group made kernel A latency-bound. RoundedDivisor computes y once per divisor with
// the same instructions, and fast_quotient is the same 3 FMAs: __fdiv_rn(a, b) wherever __fdiv_rn takes its
// fast path, which it certainly does for `ordinary` divisors, |b| in [2^-50, 2^50], and ordinary dividends,
// |a| in [2^-60, 2^56]. The callers check that per 64-group and redo the group with __fdiv_rn otherwise
// (one branch, rarely taken: all-zero or extreme values). .scratch's test of it: 8.9e9 random and
// near-tie quotients on an H100, all bit-equal to __fdiv_rn.
struct RoundedDivisor {
  static constexpr float kDivisorMin = 0x1p-50f, kDivisorMax = 0x1p50f;     // ordinary divisors' magnitudes
  static constexpr float kDividendMin = 0x1p-60f, kDividendMax = 0x1p56f;   // ordinary dividends' magnitudes
  float b, y;
  bool ordinary;
  __device__ __forceinline__ explicit RoundedDivisor(float divisor) : b(divisor) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(divisor));  // MUFU.RCP
    y = fmaf(r, fmaf(-divisor, r, 1.f), r);
    ordinary = fabsf(divisor) >= kDivisorMin && fabsf(divisor) <= kDivisorMax;
  }
  __device__ __forceinline__ float fast_quotient(float a) const { return quotient(a, b, y); }
  // The same from a divisor b and its y computed elsewhere (kernel A shares them between lanes).
  static __device__ __forceinline__ float quotient(float a, float b, float y) {
    const float q = a * y;
    return fmaf(y, fmaf(-b, q, a), q);
  }
};

// Kernel A's quantizer for one 64-column chunk of a lane's two rows, shared with the MLP kernel
// (w4a4_mlp.cuh). xs[h][j][b] is the smoothed value of row half h at k = Layout::run_k(j, tid) + b;
// the 4 lanes of a gid hold the rows' chunk between them, so all 32 lanes must call it together.
// Out: per row half the lane's two words (layout comment above), and the scale of scale group tid.
// Only row halves kHalf0 .. kHalf1 - 1 are read and written: kernel A quantizes one row half at a time,
// so that the other's 16 fp32 values are not live meanwhile (register pressure).
template <bool kUnsigned, typename Layout, int kHalf0 = 0, int kHalf1 = 2>
__device__ __forceinline__ void quantize_lane_chunk(const float (&xs)[2][4][4], int tid, uint32_t (&words)[2][2],
                                                    float (&my_scale)[2]) {
  // Per step (INT4: the whole 64-group; NVFP4: 16-groups, see quant_steps in w4a4_nvfp4.cuh) and row
  // half: the scale of the lane's group, then the codes of its runs. One group at a time keeps few
  // values live.
#pragma unroll
  for (int h = kHalf0; h < kHalf1; ++h) {
    words[h][0] = words[h][1] = 0u;
    my_scale[h] = 0.f;  // the scale this lane stores per row half: scale group tid
  }
#pragma unroll
  for (int t = 0; t < quant_steps<Layout>(); ++t) {
    float scale[2];
#pragma unroll
    for (int h = kHalf0; h < kHalf1; ++h) {
      // Signed: absmax. Unsigned: max clamped at 0 (numerics.quantize_act_int4).
      float amax = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (quant_step<Layout>(j) != t) continue;
#pragma unroll
        for (int b = 0; b < 4; ++b) amax = fmaxf(amax, kUnsigned ? xs[h][j][b] : fabsf(xs[h][j][b]));
      }
      // The lanes of this gid (lanes 4*gid .. 4*gid+3) sharing the group hold the row's group between them.
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      if constexpr (group_lanes<Layout>() == 4) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      if constexpr (kE2M1Codes<Layout>)
        scale[h] = nvfp4_group_scale(amax);
      else
        scale[h] = __fdiv_rn(amax, kUnsigned ? 15.f : 7.f);
      if constexpr (group_lanes<Layout>() == 4) {
        if (tid == t) my_scale[h] = scale[h];  // step t's group is t (INT4: 0)
      } else {  // group tid is quantized by other lanes: fetch it from one of them
        const float owner = __shfl_sync(0xffffffffu, scale[h], Layout::owner_tid(tid), 4);
        if (Layout::step_of_group(tid) == t) my_scale[h] = owner;
      }
    }
    if constexpr (kE2M1Codes<Layout>) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (quant_step<Layout>(j) != t) continue;
#pragma unroll
        for (int h = kHalf0; h < kHalf1; ++h) {
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            uint32_t nibble;
            nibble = e2m1_code(xs[h][j][b], scale[h]);
            words[h][j / 2] |= nibble << (16 * (j % 2) + 4 * b);
          }
        }
      }
    } else {
      // INT4: code = round_half_even(xs / scale) (IEEE division), clamped; scale 0 -> code 0 (the words stay
      // 0). The 16 divisions of a row half share the scale (RoundedDivisor). Their dividends need no check:
      // |xs| <= 15 scale (max / 15, absmax / 7), except an unsigned input's negative values, whose code is 0
      // for any quotient (NaN included: fmaxf(NaN, 0) = 0); and the quotient of a dividend below 2^-60 is
      // below 2^-10, code 0 either way.
#pragma unroll
      for (int h = kHalf0; h < kHalf1; ++h) {
        if (!(scale[h] > 0.f)) continue;
        // Clamped to [lo, hi]: the lower bound here (it also takes a NaN quotient to lo, as the spec's
        // clamp does), the upper one only where it can bind. With an ordinary (normal) scale it cannot:
        // |xs| <= amax and scale = fl(amax / hi) >= (amax / hi)(1 - 2^-24), so the quotient is at most
        // hi (1 + 2^-23) and rounds to hi. A subnormal scale, in the rare branch, has too few bits for that.
        constexpr float lo = kUnsigned ? 0.f : -7.f, hi = kUnsigned ? 15.f : 7.f;
        const RoundedDivisor by_scale(scale[h]);
        float q[4][4];
        if (by_scale.ordinary) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int b = 0; b < 4; ++b) q[j][b] = fmaxf(by_scale.fast_quotient(xs[h][j][b]), lo);
        } else {  // rare: a tiny or huge scale
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int b = 0; b < 4; ++b) q[j][b] = fminf(fmaxf(__fdiv_rn(xs[h][j][b], scale[h]), lo), hi);
        }
        // Round and take the integer's low 4 bits in one add: q + 1.5 * 2^23 (|q| <= 15) rounds to an
        // integer, half to even as rintf does, and holds it, two's complement, in its low mantissa bits. The
        // same codes as rintf, clamp, int conversion (the clamps' bounds are integers, so rounding commutes
        // with them) without the slower FRND and F2I.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const uint32_t nibble = __float_as_uint(q[j][b] + 0x1.8p23f) & 0xFu;
            words[h][j / 2] |= nibble << (16 * (j % 2) + 4 * b);
          }
        }
      }
    }
  }
}

// ================================================================================================
// Kernel A: activation quantization + low-rank down projection, one read of x.
//
// Work split. A warp owns one row tile (16 rows, the MMA's m16) and a *segment*: groups_per_warp
// consecutive 64-groups of K. A block of 8 warps holds 2 row tiles x 4 consecutive segments of those rows,
// or 1 row tile x 8 segments (QuantizePlan: tiles_per_block x 8 / tiles_per_block); the grid is row blocks
// x splits, split s of a row block taking the next 8 / tiles_per_block segments along K. So small M still
// fills the GPU (M = 256, K = 3072: 768 warps of one group each), and large M gets long segments, few
// partial sums and whole waves of blocks (quantize_plan, on the host, picks the block shape and
// groups_per_warp).
//
// Per 64-group a warp:
//   1. has x in registers: lane (gid, tid) loads exactly the 32 values it must pack (rows gid and gid+8,
//      k = Layout::run_k(j, tid) + b: the GEMM flavour's runs), one 8-byte load per run and row; group
//      g+1's loads are issued after group g's MMAs and are in flight while group g is quantized.
//   2. low-rank down on the tensor cores: those registers, as they are, are the A fragments of four
//      mma.sync.m16n8k16 (bf16/fp16 products, exact in fp32; fp32 accumulate) per 8 ranks, MMA j taking
//      run j of every lane. The MMA's fragments (PTX ISA "Matrix Fragments for mma.m16n8k16" with
//      16-bit floating point types), lane = 4*gid + tid, two values per register, the lower k low:
//        A (16x16)  a0: row gid, k 2tid, 2tid+1    a1: row gid+8, k 2tid, 2tid+1
//                   a2: row gid, k 2tid+8, +9      a3: row gid+8, k 2tid+8, +9
//        B (16x8)   b0: col gid, k 2tid, 2tid+1    b1: col gid, k 2tid+8, +9
//        C (16x8)   c0, c1: row gid, cols 2tid, 2tid+1    c2, c3: row gid+8, same cols
//      Lane tid supplies the MMA's k slots 2tid, 2tid+1, 2tid+8, 2tid+9 in A and in B alike, and a dot
//      product does not depend on the order of its k: so slot 2tid+b (b < 2) and 2tid+8+(b-2) may hold
//      any k as long as A and B agree lane by lane. MMA j gives them k = run_k(j, tid) + b, so the
//      8 bytes of x a lane loaded for run j and rows gid / gid+8 are a0 / a1 (values 0, 1) and a2 / a3
//      (values 2, 3), and b0 / b1 are the 8 bytes of lora_down[rank 8n + gid] at the same k (rank =
//      column; lora_down [R, K] has k contiguous: one 8-byte load per run, 16 bytes where two runs
//      are adjacent). The four lanes of a gid own disjoint runs, and the four runs of a lane cover the
//      group, so each MMA sums 16 distinct k and the four MMAs the group's 64.
//      Ranks are taken 32 at a time (4 rank tiles of 8). The accumulators (the C fragments, 16 fp32 per
//      lane) live in the warp's part of shared memory (seg_sum) between groups: kept in registers through
//      the quantizer they made ptxas spill at the 128 registers that 2 blocks per SM allow. A rank above
//      32 costs one more pass over the segment, which reads x again (from L2: the block just read it) but
//      does not quantize again.
//   3. quantizes (first pass only): smooth (fp32 add of the unsigned shift, IEEE division by smooth), per
//      row absmax by shuffles between the 4 lanes of a gid, codes (quantize_lane_chunk), and stores the
//      lane's words where the GEMM's lane of the same (gid, tid) loads them, and the scales. The divisions
//      are RoundedDivisor's: bit-identical to __fdiv_rn without its per-division branch (above).
// Then the block adds its segments' accumulators, in segment order, in shared memory, and writes lora_act
// (one split), or its split's partial sums to a workspace, lora_partials [splits][M_pad][R16]. In the
// second case the block counts itself in on its row block's counter (atomicAdd after a __threadfence, as
// in the CUDA threadFenceReduction sample); the last block of the row block to arrive adds the splits'
// partials in split order, writes lora_act and sets the counter back to 0 (the bindings keep one
// zero-initialized counter buffer per device and stream). No fp32 atomics: every sum has an order fixed
// by the plan, i.e. by the shape and the GPU's SM count, so lora_act is the same bit for bit on every run.
//
// sm_75 has no bf16 MMA and its f16 one is m16n8k8: mma_m16n8k16_f32 below takes two of those for fp16,
// and computes the same fragment product on the CUDA cores for bf16; the kernel is otherwise the same.
// ================================================================================================

constexpr int kQuantRows = 16;  // a row tile: the MMA's m16
constexpr int kQuantWarps = 8;
constexpr int kQuantThreads = kQuantWarps * 32;
constexpr int kQuantRankChunk = 32;                      // ranks per pass over a segment
constexpr int kQuantRankTiles = kQuantRankChunk / 8;     // n8 tiles: 16 fp32 accumulators per lane
constexpr int kQuantSumStride = kQuantRankChunk + 8;     // floats per seg_sum row (banks: the kernel)
// quantize_plan's model: a block costs about groups_per_warp + kQuantBlockCostGroups groups' time; segments
// of at most kQuantMaxGroupsPerWarp groups (the longest measured).
constexpr int kQuantBlockCostGroups = 2;
constexpr int kQuantMaxGroupsPerWarp = 16;

// d += A(16x16) * B(16x8): T = bf16 or fp16 inputs, fp32 accumulate (fragments as in the comment above).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif defined(__CUDA_ARCH__)
  if constexpr (!kBf16) {
    // Turing's f16 MMA is m16n8k8 (A: a0 row gid, a1 row gid+8 at k 2tid, 2tid+1; B: b0): slots 0..7
    // of the k16 fragments are {a0, a1} x b0, slots 8..15 {a2, a3} x b1.
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[2]), "r"(a[3]), "r"(b1));
  } else {
    // No bf16 MMA before sm_80: the same product on the CUDA cores. Lane (gid, t) holds rows gid, gid+8
    // of A and column gid of B at the k slots of t; output (row gid + 8h, column 2tid + e) gathers them.
    // Not unrolled: four copies of the shuffles hold too many registers and spill.
    const int lane = threadIdx.x % 32, gid = lane / 4, tid = lane % 4;
#pragma unroll 1
    for (int t = 0; t < 4; ++t) {
      uint32_t a_t[4], b_t[2][2];  // a_t: the four A registers of lane (gid, t); b_t[e]: column 2tid + e
#pragma unroll
      for (int i = 0; i < 4; ++i) a_t[i] = __shfl_sync(0xffffffffu, a[i], 4 * gid + t);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        b_t[e][0] = __shfl_sync(0xffffffffu, b0, 4 * (2 * tid + e) + t);
        b_t[e][1] = __shfl_sync(0xffffffffu, b1, 4 * (2 * tid + e) + t);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int s = 0; s < 2; ++s) {  // k slots 2t, 2t+1 (s = 0) and 2t+8, 2t+9 (s = 1)
            const float2 x = Dtype<T>::to_float2(a_t[2 * s + h]), w = Dtype<T>::to_float2(b_t[e][s]);
            d[2 * h + e] = fmaf(x.x, w.x, d[2 * h + e]);
            d[2 * h + e] = fmaf(x.y, w.y, d[2 * h + e]);
          }
        }
      }
    }
  }
#endif
}

// How a launch splits the work (see the kernel's comment): chosen on the host from the shape alone
// (quantize_plan), passed to the kernel.
struct QuantizePlan {
  int tiles_per_block;  // row tiles per block: 1, 2, 4 or 8; the block's 8 warps hold 8 / this segments
  int groups_per_warp;  // 64-groups per segment
  int splits;           // blocks per row block, along K
  int row_blocks;       // M_pad / (16 * tiles_per_block)
  int64_t partial_floats;  // workspace lora_partials: splits * M_pad * R16 if splits > 1 and R16 > 0, else 0
};

// x of group g at the lane's runs, rows gid / gid+8 of its tile: raw[h][j] = 4 values of T at k =
// g*64 + run_k(j, tid), zeros for rows past M (padding) and k past K (NVFP4's last chunk). lane_x[h] =
// x + row * ldx + run_k(0, tid): run_k(j, tid) - run_k(0, tid) does not depend on tid in any layout, so
// the four loads are one pointer and immediate offsets (fewer registers than a pointer per load).
template <typename T, typename Layout>
__device__ __forceinline__ void load_x_group(const T* const (&lane_x)[2], const bool (&row_valid)[2], int K, int g,
                                             int tid, uint2 (&raw)[2][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int dk = Layout::run_k(j, tid) - Layout::run_k(0, tid);
    // A run of 4 never straddles K (a multiple of 16; of 64 for INT4, whose chunks are all in range).
    const bool k_valid = !kE2M1Codes<Layout> || g * kGroup + Layout::run_k(j, tid) < K;
#pragma unroll
    for (int h = 0; h < 2; ++h)
      raw[h][j] = row_valid[h] && k_valid ? __ldg(reinterpret_cast<const uint2*>(lane_x[h] + g * kGroup + dk))
                                          : make_uint2(0u, 0u);
  }
}

// Group g's lora_down rows of this pass into L1 (one 128-byte line per rank: lane l takes rank r0 + l), a
// group ahead of lora_down_group, whose fragment loads then hit L1 instead of waiting on L2 (H100, kernel A
// at rank 32: 4608 x 15360 155 -> 151 us on the wgmma layout, 140 -> 136 on s8's). INT4 layouts only (the
// NVFP4 ones are a correctness feature on the GPUs without block-scaled FP4, and ptxas spills there).
template <typename T>
__device__ __forceinline__ void prefetch_lora_down(const T* __restrict__ lora_down, int K, int R, int r0, int g,
                                                   int lane) {  // g < G: the caller's next group
  static_assert(kQuantRankChunk == 32, "one lane per rank of a pass");
  const int rank = r0 + lane;
  if (rank < R)
    asm volatile("prefetch.global.L1 [%0];" ::"l"(lora_down + static_cast<int64_t>(rank) * K + g * kGroup));
}

// sums += x(the tile's 16 rows, group g) . lora_down(ranks r0 .. r0 + 31, group g)^T, n8 tile n of the
// ranks at columns 8n .. 8n+7 of sums (the warp's part of seg_sum: this lane's C fragment elements, row
// gid + 8(e/2), column 8n + 2tid + e%2). raw[h][j] is the A fragment of MMA j as loaded (kernel comment);
// b = {b0, b1} of MMA j is lora_down[r0 + 8n + gid] at k = g*64 + run_k(j, tid) + 0..3, zeros for ranks
// past R (so tiles past the pass's ranks add zeros, unread) and k past K. Runs 2p and 2p+1 are one 16-byte
// load where the layout has them adjacent (all but E2M1Layout); an access unit lies inside one 16-group,
// so NVFP4's K tail (k_left a multiple of 16) takes or skips it whole.
template <typename T, typename Layout>
__device__ __forceinline__ void lora_down_group(volatile float (*sums)[kQuantSumStride], const uint2 (&raw)[2][4],
                                                const T* __restrict__ lora_down, int K, int R, int r0, int g, int gid,
                                                int tid) {
  const int k_left = kE2M1Codes<Layout> ? K - g * kGroup : kGroup;  // < 64 only in NVFP4's last chunk
  uint2 b[kQuantRankTiles][4];
#pragma unroll
  for (int n = 0; n < kQuantRankTiles; ++n) {
    const int rank = r0 + 8 * n + gid;
    const bool in = rank < R;
    const T* src = lora_down + static_cast<int64_t>(rank) * K + g * kGroup;
    if constexpr (Layout::kAdjacentRuns >= 2) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int k = Layout::run_k(2 * p, tid);
        const uint4 v = in && k < k_left ? __ldg(reinterpret_cast<const uint4*>(src + k)) : make_uint4(0u, 0u, 0u, 0u);
        b[n][2 * p] = make_uint2(v.x, v.y);
        b[n][2 * p + 1] = make_uint2(v.z, v.w);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = Layout::run_k(j, tid);
        b[n][j] = in && k < k_left ? __ldg(reinterpret_cast<const uint2*>(src + k)) : make_uint2(0u, 0u);
      }
    }
  }
  // Per rank tile: its accumulators from shared memory, its four MMAs, back.
#pragma unroll
  for (int n = 0; n < kQuantRankTiles; ++n) {
    float acc[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = sums[gid + 8 * (e / 2)][8 * n + 2 * tid + e % 2];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t a[4] = {raw[0][j].x, raw[1][j].x, raw[0][j].y, raw[1][j].y};
      mma_m16n8k16_f32<T>(acc, a, b[n][j].x, b[n][j].y);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) sums[gid + 8 * (e / 2)][8 * n + 2 * tid + e % 2] = acc[e];
  }
}

// Quantize group g of the lane's two rows from the raw x it loaded, and store codes and scales. All 32
// lanes of the warp call it together; divisors is the warp's scratch in shared memory.
template <typename T, bool kUnsigned, typename Layout>
__device__ __forceinline__ void quantize_group(const QuantizeArgs& a, const uint2 (&raw)[2][4], const int (&rows)[2],
                                               const bool (&row_valid)[2], int g, int lane,
                                               float (&divisors)[2][kGroup]) {
  const T* smooth = static_cast<const T*>(a.smooth);
  const int tid = lane % 4;
  const int K = a.K, M_pad = a.M_pad, G = (K + kGroup - 1) / kGroup;
  // Bytes per token: two codes per byte, or one E4M3 byte per code (the wgmma path).
  const int64_t act_row_bytes = static_cast<int64_t>(G) * (kE4M3Bytes<Layout> ? kGroup : kGroup / 2);
  constexpr int kScaleGroups = ScaleGroupsOf<Layout>::value;  // per 64 columns: 1 (INT4) or 4 (NVFP4)
  uint8_t* act_packed = a.act_packed;
  float* act_scales = a.act_scales;

  // Spec (numerics.smooth_input): fp32 add of the shift, then IEEE fp32 division by smooth, here by
  // RoundedDivisor; the group is redone with __fdiv_rn unless every divisor, and every dividend of a row in
  // M, is in its fast path's range (the smallest and largest magnitudes tell: an infinity fails; a NaN
  // passes, and its code is the same either way). A zero dividend is exact on the fast path (a signed zero
  // quotient, as __fdiv_rn gives): signed rows check the smallest magnitude anyway (a tiny x is possible),
  // unsigned ones need not, since x + 0.171875 for a 16-bit x is 0 or at least 2^-13 in magnitude.
  // The divisors' y: each column's once per warp (lane l: columns 2l, 2l+1), not once by each of the 8 lanes
  // of a tid that hold the column; then every lane reads its runs' divisors and y from shared memory.
  // Rows past M are padding: their x is 0 and their shift 0, so they quantize as zeros (codes 0, scale 0).
  const float shift[2] = {kUnsigned && row_valid[0] ? 0.171875f : 0.f, kUnsigned && row_valid[1] ? 0.171875f : 0.f};
  auto shifted = [&](const uint2 (&src)[2][4], int h, int j, int b) {
    const float xf = Dtype<T>::to_float(reinterpret_cast<const T*>(&src[h][j])[b]);
    return kUnsigned ? __fadd_rn(xf, shift[h]) : xf;
  };
  using D = RoundedDivisor;
  bool divisors_ordinary;
  {
    const int k = g * kGroup + 2 * lane;  // K is a multiple of 16: a pair is all in range or all out
    float2 b = make_float2(1.f, 1.f);     // 1 past K (the values are 0)
    if (k < K) b = Dtype<T>::to_float2(__ldg(reinterpret_cast<const uint32_t*>(smooth + k)));
    const D d0(b.x), d1(b.y);
    __syncwarp();  // every lane is done reading the previous group's
    *reinterpret_cast<float2*>(&divisors[0][2 * lane]) = b;
    *reinterpret_cast<float2*>(&divisors[1][2 * lane]) = make_float2(d0.y, d1.y);
    __syncwarp();  // the stores are seen by every lane (a vote does not order memory)
    divisors_ordinary = __all_sync(0xffffffffu, d0.ordinary && d1.ordinary);
  }
  float xs[2][4][4];  // [row half][run j][b]: smoothed values at k = g*64 + Layout::run_k(j, tid) + b
  float a_min[2] = {D::kDividendMax, D::kDividendMax}, a_max[2] = {D::kDividendMin, D::kDividendMin};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float4 bv = *reinterpret_cast<const float4*>(&divisors[0][Layout::run_k(j, tid)]);
    const float4 yv = *reinterpret_cast<const float4*>(&divisors[1][Layout::run_k(j, tid)]);
    const float bs[4] = {bv.x, bv.y, bv.z, bv.w}, ys[4] = {yv.x, yv.y, yv.z, yv.w};
#pragma unroll
    for (int b = 0; b < 4; ++b) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float xf = shifted(raw, h, j, b);
        xs[h][j][b] = D::quotient(xf, bs[b], ys[b]);
        if (!kUnsigned) a_min[h] = fminf(a_min[h], fabsf(xf));
        a_max[h] = fmaxf(a_max[h], fabsf(xf));
      }
    }
  }
  bool fast = divisors_ordinary;
#pragma unroll
  for (int h = 0; h < 2; ++h)
    fast = fast && (!row_valid[h] || (a_min[h] >= D::kDividendMin && a_max[h] <= D::kDividendMax));
  if (!fast) {
    // Rare: zeros or extreme values. x is loaded again (L1), so that raw need not stay live.
    uint2 again[2][4];
    const T* const lane_x[2] = {static_cast<const T*>(a.x) + rows[0] * a.ldx + Layout::run_k(0, tid),
                                static_cast<const T*>(a.x) + rows[1] * a.ldx + Layout::run_k(0, tid)};
    load_x_group<T, Layout>(lane_x, row_valid, K, g, tid, again);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float4 bv = *reinterpret_cast<const float4*>(&divisors[0][Layout::run_k(j, tid)]);
      const float bs[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int b = 0; b < 4; ++b) xs[h][j][b] = __fdiv_rn(shifted(again, h, j, b), bs[b]);
    }
  }

  // One row half at a time (quantize_lane_chunk's kHalf0, kHalf1): fewer values live.
  uint32_t words[2][2];
  float my_scale[2];
  quantize_lane_chunk<kUnsigned, Layout, 0, 1>(xs, tid, words, my_scale);
  quantize_lane_chunk<kUnsigned, Layout, 1, 2>(xs, tid, words, my_scale);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if constexpr (kE4M3Bytes<Layout>) {
      store_e4m3_codes<kUnsigned>(act_packed + rows[h] * act_row_bytes + g * kGroup, tid, words[h]);
      if (tid == 0) act_scales[static_cast<int64_t>(g) * M_pad + e4m3_scale_slot(rows[h])] = my_scale[h];
    } else {
      store_words<Layout>(act_packed + rows[h] * act_row_bytes + g * (kGroup / 2), tid, words[h][0], words[h][1]);
      // Every lane of a row computed all its scales; lane tid stores scale group tid.
      if (tid < kScaleGroups) act_scales[(static_cast<int64_t>(g) * kScaleGroups + tid) * M_pad + rows[h]] = my_scale[h];
    }
  }
}

// Launch bounds: 2 blocks of 256 threads per SM leave ptxas 128 registers, which it uses (two groups of x,
// the quantizer's fp32 values and reciprocals, a rank tile's lora_down fragments; the accumulators wait in
// shared memory). On sm_75 ptxas spills a few bytes within 128 registers: one block per SM there (Turing
// has 64K registers per SM; its bandwidth needs fewer loads in flight).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr int kQuantMinBlocks = 1;
#else
constexpr int kQuantMinBlocks = 2;
#endif

template <typename T, bool kUnsigned, typename Layout>
__global__ void __launch_bounds__(kQuantThreads, kQuantMinBlocks)
quantize_act_lora_down_kernel(const QuantizeArgs a, const QuantizePlan plan) {
  // seg_sum[w][m][r]: warp w's accumulators of this pass's ranks, row m of its tile (lora_down_group).
  // 40 floats per row: a warp's accesses to one C element of its lanes (row gid + 8h, rank 8n + 2tid + e)
  // hit 16 banks twice each, rather than 4 banks 8 times with 32.
  __shared__ __align__(16) float seg_sum[kQuantWarps][kQuantRows][kQuantSumStride];
  __shared__ __align__(16) float smooth_div[kQuantWarps][2][kGroup];  // quantize_group's: a group's divisors and y
  __shared__ bool last_block;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tid = lane % 4;
  const int M = a.M, K = a.K, M_pad = a.M_pad, R = a.R, R16 = a.R16;
  const int G = (K + kGroup - 1) / kGroup;  // NVFP4: K is a multiple of 16; the last chunk is zero-padded
  const T* x = static_cast<const T*>(a.x);
  const T* lora_down = static_cast<const T*>(a.lora_down);

  // This block: row block blockIdx.x / splits, split blockIdx.x % splits (a row block's splits are
  // neighbours in launch order, so its partial sums are still in L2 when its last block adds them).
  const int tiles_per_block = plan.tiles_per_block, segments_per_block = kQuantWarps / tiles_per_block;
  const int row_block = blockIdx.x / plan.splits, split = blockIdx.x % plan.splits;
  const int block_rows = tiles_per_block * kQuantRows, block_row = row_block * block_rows;
  // This warp: row tile warp % tiles_per_block of the block, segment warp / tiles_per_block of the split
  // (warps of one segment are neighbours: they read the same lora_down, which L1 then serves).
  const int tile = warp % tiles_per_block, segment = warp / tiles_per_block;
  const int row_base = block_row + tile * kQuantRows;
  const int g_begin = (split * segments_per_block + segment) * plan.groups_per_warp;
  const int g_end = min(G, g_begin + plan.groups_per_warp);  // empty for segments past K

  // The two rows this lane quantizes; rows past M are padding: zeros in, zeros out (codes, scales, lora_act).
  const int rows[2] = {row_base + gid, row_base + gid + 8};
  const bool row_valid[2] = {rows[0] < M, rows[1] < M};
  const T* const lane_x[2] = {x + (row_valid[0] ? rows[0] * a.ldx + Layout::run_k(0, tid) : 0),
                              x + (row_valid[1] ? rows[1] * a.ldx + Layout::run_k(0, tid) : 0)};

  const int passes = R16 > 0 ? (R16 + kQuantRankChunk - 1) / kQuantRankChunk : 1;  // rank 0: quantize only
  for (int pass = 0; pass < passes; ++pass) {
    const int r0 = pass * kQuantRankChunk, rank_count = min(kQuantRankChunk, R16 - r0);  // <= 0 at rank 0
    // The warp's fp32 accumulators (the MMAs' C fragments) stay in its part of seg_sum between groups,
    // not in registers: the quantizer needs those 16 registers, and the block sums seg_sum at the end.
    volatile float(*sums)[kQuantSumStride] = seg_sum[warp];
#pragma unroll
    for (int n = 0; n < kQuantRankTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sums[gid + 8 * (e / 2)][8 * n + 2 * tid + e % 2] = 0.f;

    // Group g+1's x is loaded while group g is quantized (after its MMAs, which then need fewer registers).
    uint2 raw_next[2][4];
    if (g_begin < g_end) load_x_group<T, Layout>(lane_x, row_valid, K, g_begin, tid, raw_next);
    for (int g = g_begin; g < g_end; ++g) {
      uint2 raw[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 4; ++j) raw[h][j] = raw_next[h][j];
      if (rank_count > 0) lora_down_group<T, Layout>(sums, raw, lora_down, K, R, r0, g, gid, tid);
      if (g + 1 < g_end) {
        load_x_group<T, Layout>(lane_x, row_valid, K, g + 1, tid, raw_next);
        if (rank_count > 0 && !kE2M1Codes<Layout>) prefetch_lora_down<T>(lora_down, K, R, r0, g + 1, lane);
      }
      if (pass == 0) quantize_group<T, kUnsigned, Layout>(a, raw, rows, row_valid, g, lane, smooth_div[warp]);
    }
    if (rank_count <= 0) break;

    // The block's sum of this pass's ranks: segments of the same rows added in segment order.
    __syncthreads();
    for (int e = threadIdx.x; e < block_rows * rank_count; e += kQuantThreads) {
      const int m = e / rank_count, r = e % rank_count;  // row of the block, rank of the pass
      const int t = m / kQuantRows, mt = m % kQuantRows;
      float v = seg_sum[t][mt][r];
      for (int s = 1; s < segments_per_block; ++s) v += seg_sum[s * tiles_per_block + t][mt][r];
      const int64_t row = block_row + m;
      const int rank = r0 + r;
      if (plan.splits == 1)
        a.lora_act[row * R16 + rank] = rank < R ? v : 0.f;
      else
        a.lora_partials[(static_cast<int64_t>(split) * M_pad + row) * R16 + rank] = v;
    }
    __syncthreads();  // seg_sum is refilled by the next pass
  }

  // Split K: the row block's last block to arrive adds the splits' partial sums, in split order.
  if (plan.splits > 1 && R16 > 0) {
    __threadfence();  // this thread's partials reach the GPU's view before the block is counted in
    __syncthreads();
    if (threadIdx.x == 0) last_block = atomicAdd(a.counters + row_block, 1) == plan.splits - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    const int64_t split_stride = static_cast<int64_t>(M_pad) * R16;
    const float* partials = a.lora_partials + static_cast<int64_t>(block_row) * R16;
    float* out = a.lora_act + static_cast<int64_t>(block_row) * R16;
    // Four outputs per thread at a time, so that 4 loads (8 with the unroll) are in flight per step.
    constexpr int kOuts = 4;
    for (int e0 = threadIdx.x; e0 < block_rows * R16; e0 += kOuts * kQuantThreads) {
      float v[kOuts];
#pragma unroll
      for (int i = 0; i < kOuts; ++i) {
        const int e = e0 + i * kQuantThreads;
        v[i] = e < block_rows * R16 ? __ldcg(partials + e) : 0.f;  // L2: written by other SMs
      }
#pragma unroll 2
      for (int s = 1; s < plan.splits; ++s) {
#pragma unroll
        for (int i = 0; i < kOuts; ++i) {
          const int e = e0 + i * kQuantThreads;
          if (e < block_rows * R16) v[i] += __ldcg(partials + s * split_stride + e);
        }
      }
#pragma unroll
      for (int i = 0; i < kOuts; ++i) {
        const int e = e0 + i * kQuantThreads;
        if (e < block_rows * R16) out[e] = e % R16 < R ? v[i] : 0.f;
      }
    }
    if (threadIdx.x == 0) a.counters[row_block] = 0;  // ready for the next launch on this stream
  }
}

// ================================================================================================
// Kernel B: W4A4 GEMM, integer tensor cores (flavour Mma), fused epilogue.
//
// Block tile 128 x 128, 8 warps as 4 (rows) x 2 (cols); warp tile 32 x 64 = 2 x 8 mma tiles.
// Per 64-group every lane loads its words straight from global memory (per row and chunk: one 8-byte
// access for the INT4 flavours; a quad of lanes reads a row's whole 32-byte chunk, so every sector
// is used; warps sharing a row/col band hit L1), double-buffered in registers: group g+1 is in
// flight while group g is multiplied. Per group and 16x8 tile: the flavour's MMA chain over the 64 k
// (INT8: two k32 MMAs; s4: one k64, or four m8n8k32 on Turing) into a zeroed int32 accumulator
// (exact), then acc += (float(sum) * sx) * sw in fp32, the spec's order.
// Epilogue: acc += lora_act . lora_up^T (fp32, staged through shared memory 16 ranks at a time),
// + bias, one rounding to the output dtype, guarded stores (rows < M, cols < N).
// ================================================================================================

constexpr int kGemmWarpsM = 4, kGemmWarpsN = 2;
constexpr int kGemmThreads = kGemmWarpsM * kGemmWarpsN * 32;
constexpr int kWarpTilesM = 2;   // m16 tiles per warp
constexpr int kWarpTilesN = 8;   // n8 tiles per warp
constexpr int kWarpM = kWarpTilesM * 16, kWarpN = kWarpTilesN * 8;
static_assert(kGemmBlockM == kGemmWarpsM * kWarpM, "block tile M");
static_assert(kGemmBlockN == kGemmWarpsN * kWarpN, "block tile N");
constexpr int kLoraChunk = 16;  // ranks staged in shared memory at a time

// A lane's place in the block tile. Its accumulator acc[i][j][e] (the C fragment of mma tile (i, j))
// is row warp_row + 16i + gid + 8(e/2), column warp_col + 8j + 2tid + e%2.
struct GemmLane {
  int warp, lane, gid, tid, warp_m, warp_n, block_row, block_col, warp_row, warp_col;
  __device__ GemmLane()
      : warp(threadIdx.x / 32), lane(threadIdx.x % 32), gid(lane / 4), tid(lane % 4), warp_m(warp / kGemmWarpsN),
        warp_n(warp % kGemmWarpsN), block_row(blockIdx.y * kGemmBlockM), block_col(blockIdx.x * kGemmBlockN),
        warp_row(block_row + warp_m * kWarpM), warp_col(block_col + warp_n * kWarpN) {}
};

// The weight scales of columns col, col + 1 (col even and < N) in scale row sg, as fp32: T (INT4) or
// E4M3 (NVFP4) values of the file's [K/group, N].
template <typename T, typename Mma>
__device__ __forceinline__ float2 load_wscale_pair(const void* __restrict__ wscales, int64_t idx) {
  if constexpr (kE2M1Codes<Mma>) {
    const __nv_fp8x2_storage_t raw = __ldg(reinterpret_cast<const unsigned short*>(wscales) + idx / 2);
    return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(raw, __NV_E4M3)));
  } else {
    return Dtype<T>::to_float2(__ldg(reinterpret_cast<const uint32_t*>(static_cast<const T*>(wscales) + idx)));
  }
}

// One 64-chunk's words of the lane: activations a[i][h] (m16 tile i, rows gid + 8h) and weights b[j]
// (n8 tile j, weight row b_row[j]).
template <typename Mma>
__device__ __forceinline__ void load_chunk(const GemmArgs& p, const uint8_t* a_src, int64_t act_row_bytes,
                                           const int (&b_row)[kWarpTilesN], int g, int tid,
                                           uint2 (&a)[kWarpTilesM][2], uint2 (&b)[kWarpTilesN]) {
  using Layout = typename Mma::Layout;
#pragma unroll
  for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      a[i][h] = load_words<Layout>(a_src + (16 * i + 8 * h) * act_row_bytes + g * (kGroup / 2), tid);
  const int64_t w_row_bytes = p.K / 2;
#pragma unroll
  for (int j = 0; j < kWarpTilesN; ++j) {
    const uint8_t* chunk = p.qweight + b_row[j] * w_row_bytes + g * (kGroup / 2);
    if constexpr (kE2M1Codes<Mma>)  // NVFP4 K is a multiple of 16: the last chunk may end early
      b[j] = load_words<Layout, true>(chunk, tid, p.K - g * kGroup);
    else
      b[j] = load_words<Layout>(chunk, tid);
  }
}

// The block's fp32 results before the bias, in the lanes' accumulators (GemmLane): the quantized
// branch, NVFP4's factors, the low-rank branch. Shared by w4a4_gemm_kernel and the MLP's fc1 kernel
// (w4a4_mlp.cuh), which differ only in what their epilogue does with it.
template <typename T, bool kActUnsigned, typename Mma>
__device__ __forceinline__ void w4a4_block_acc(const GemmArgs& p, float (&acc)[kWarpTilesM][kWarpTilesN][4]) {
  constexpr int kScaleGroups = ScaleGroupsOf<Mma>::value;  // per 64-k chunk: 1 (INT4) or 4 (NVFP4)
  const GemmLane t;
  const int gid = t.gid, tid = t.tid, warp_m = t.warp_m, warp_n = t.warp_n;
  const int block_row = t.block_row, block_col = t.block_col, warp_row = t.warp_row, warp_col = t.warp_col;
  const int G = p.G, N = p.N, M_pad = p.M_pad;
  const int scale_rows = p.K / (kGroup / kScaleGroups);  // rows of wscales (NVFP4: K/16 <= 4G)

  const int64_t act_row_bytes = static_cast<int64_t>(G) * (kGroup / 2);
  const uint8_t* a_src = p.act_packed + (warp_row + gid) * act_row_bytes;
  int b_row[kWarpTilesN];  // weight rows of the lane's n8 tiles; past N: row N-1, its outputs are dropped
#pragma unroll
  for (int j = 0; j < kWarpTilesN; ++j) b_row[j] = min(warp_col + 8 * j + gid, N - 1);

#pragma unroll
  for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  uint2 a_cur[kWarpTilesM][2], b_cur[kWarpTilesN];
  load_chunk<Mma>(p, a_src, act_row_bytes, b_row, 0, tid, a_cur, b_cur);

  for (int g = 0; g < G; ++g) {
    // Prefetch group g+1 (the last iteration re-reads group g: harmless, and branch-free).
    uint2 a_next[kWarpTilesM][2], b_next[kWarpTilesN];
    load_chunk<Mma>(p, a_src, act_row_bytes, b_row, min(g + 1, G - 1), tid, a_next, b_next);

    // The words as the flavour's fragment registers (INT8: nibbles expanded to bytes), once per group
    // and tile, outside the i x j MMA loop.
    typename Mma::AFrag a_frag[kWarpTilesM];
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) a_frag[i] = Mma::template a_frag<kActUnsigned>(a_cur[i][0], a_cur[i][1]);
    typename Mma::BFrag b_frag[kWarpTilesN];
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j) b_frag[j] = Mma::b_frag(b_cur[j]);

    if constexpr (kBlockScaled<Mma>) {
      // sm_120 NVFP4: per m16 tile the scale register of row gid + 8(tid%2), per n8 tile that of
      // column gid (w4a4_nvfp4_bs.cuh: lanes tid 0 / 1 supply them), then one block-scaled MMA per
      // 16x8 tile straight into the fp32 accumulator.
      const int64_t sg = static_cast<int64_t>(g) * kScaleGroups;
      uint32_t sfa[kWarpTilesM], sfb[kWarpTilesN];
#pragma unroll
      for (int i = 0; i < kWarpTilesM; ++i)
        sfa[i] = Mma::act_scale_reg(p.act_scales + sg * M_pad + warp_row + i * 16 + gid + 8 * (tid & 1), M_pad);
#pragma unroll
      for (int j = 0; j < kWarpTilesN; ++j)
        sfb[j] = Mma::wgt_scale_reg(static_cast<const uint8_t*>(p.wscales) + sg * N + b_row[j], N,
                                    scale_rows - static_cast<int>(sg));
#pragma unroll
      for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kWarpTilesN; ++j) Mma::mma(acc[i][j], a_frag[i], b_frag[j], sfa[i], sfb[j]);
    } else {
      // Per scale group (INT4: the 64-group; NVFP4: each of its four 16-groups): its scales, sx for the
      // lane's 4 rows and sw for its 16 columns, then per 16x8 tile its exact integer dot product.
      // Not unrolled: NVFP4's four groups unrolled would hoist all their scales and spill.
#pragma unroll 1
      for (int s = 0; s < kScaleGroups; ++s) {
        const int64_t sg = static_cast<int64_t>(g) * kScaleGroups + s;
        float sx[kWarpTilesM][2];
#pragma unroll
        for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) sx[i][h] = __ldg(p.act_scales + sg * M_pad + warp_row + i * 16 + gid + 8 * h);
        // NVFP4 K may end inside the chunk: scale rows past it read the last one, times zero codes.
        const int64_t sw_row = kE2M1Codes<Mma> ? min(sg, static_cast<int64_t>(scale_rows - 1)) : sg;
        float2 sw[kWarpTilesN];
#pragma unroll
        for (int j = 0; j < kWarpTilesN; ++j) {
          const int col = min(warp_col + j * 8 + tid * 2, N - 2);  // N is even; columns past N are dropped
          sw[j] = load_wscale_pair<T, Mma>(p.wscales, sw_row * N + col);
        }
#pragma unroll
        for (int i = 0; i < kWarpTilesM; ++i) {
#pragma unroll
          for (int j = 0; j < kWarpTilesN; ++j) {
            int32_t sum[4] = {0, 0, 0, 0};  // this scale group's exact integer dot products
            scale_group_dot<Mma, kActUnsigned>(sum, a_frag[i], b_frag[j], s);
            acc[i][j][0] = fmaf(static_cast<float>(sum[0]) * sx[i][0], sw[j].x, acc[i][j][0]);
            acc[i][j][1] = fmaf(static_cast<float>(sum[1]) * sx[i][0], sw[j].y, acc[i][j][1]);
            acc[i][j][2] = fmaf(static_cast<float>(sum[2]) * sx[i][1], sw[j].x, acc[i][j][2]);
            acc[i][j][3] = fmaf(static_cast<float>(sum[3]) * sx[i][1], sw[j].y, acc[i][j][3]);
          }
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) {
      a_cur[i][0] = a_next[i][0];
      a_cur[i][1] = a_next[i][1];
    }
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j) b_cur[j] = b_next[j];
  }

  // NVFP4: the per-tensor and per-channel factors on the quantized branch's sum, in the spec's order
  // (acc * (wtscale / 4) * wcscales[n]). The block-scaled MMA sums E2M1 values, not twice them: its
  // sum is times 4 (exact) first, folded into alpha (4 * alpha is exact too, so the product is the same).
  if constexpr (kE2M1Codes<Mma>) {
    float alpha = __ldg(p.wtscale) * 0.25f;
    if constexpr (kBlockScaled<Mma>) alpha *= 4.f;
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j) {
      const int col = min(warp_col + j * 8 + tid * 2, N - 2);
      const float2 cs = __ldg(reinterpret_cast<const float2*>(p.wcscales + col));
#pragma unroll
      for (int i = 0; i < kWarpTilesM; ++i) {
        acc[i][j][0] = (acc[i][j][0] * alpha) * cs.x;
        acc[i][j][1] = (acc[i][j][1] * alpha) * cs.y;
        acc[i][j][2] = (acc[i][j][2] * alpha) * cs.x;
        acc[i][j][3] = (acc[i][j][3] * alpha) * cs.y;
      }
    }
  }

  // ---------------- epilogue 1: low-rank branch, fp32
  if (p.R16 > 0) {
    // [rank][row] and [rank][col]: a lane reads 4 rows (gid varies: 8 banks) and 8 float2 columns.
    __shared__ __align__(16) float la_s[kLoraChunk][kGemmBlockM + 4];
    __shared__ __align__(16) float up_s[kLoraChunk][kGemmBlockN + 4];
    const T* lora_up = static_cast<const T*>(p.lora_up);
    for (int r0 = 0; r0 < p.R16; r0 += kLoraChunk) {
      __syncthreads();
      for (int e = threadIdx.x; e < kLoraChunk * kGemmBlockM; e += kGemmThreads) {
        const int row = e / kLoraChunk, r = e % kLoraChunk;
        la_s[r][row] = __ldg(p.lora_act + static_cast<int64_t>(block_row + row) * p.R16 + r0 + r);
      }
      for (int e = threadIdx.x; e < kLoraChunk * kGemmBlockN; e += kGemmThreads) {
        const int col = e / kLoraChunk, r = e % kLoraChunk;
        const int n = block_col + col, rank = r0 + r;  // the file's [N, R]: zero past either
        up_s[r][col] = (n < N && rank < p.R) ? Dtype<T>::to_float(lora_up[static_cast<int64_t>(n) * p.R + rank]) : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int r = 0; r < kLoraChunk; ++r) {
        float la[kWarpTilesM][2];
#pragma unroll
        for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) la[i][h] = la_s[r][warp_m * kWarpM + i * 16 + gid + 8 * h];
#pragma unroll
        for (int j = 0; j < kWarpTilesN; ++j) {
          const float2 up = *reinterpret_cast<const float2*>(&up_s[r][warp_n * kWarpN + j * 8 + tid * 2]);
#pragma unroll
          for (int i = 0; i < kWarpTilesM; ++i) {
            acc[i][j][0] = fmaf(la[i][0], up.x, acc[i][j][0]);
            acc[i][j][1] = fmaf(la[i][0], up.y, acc[i][j][1]);
            acc[i][j][2] = fmaf(la[i][1], up.x, acc[i][j][2]);
            acc[i][j][3] = fmaf(la[i][1], up.y, acc[i][j][3]);
          }
        }
      }
    }
  }
}

// The bias of columns col, col + 1 (col even, < N), fp32; zeros for a layer without one.
template <typename T>
__device__ __forceinline__ float2 load_bias_pair(const void* bias, int col) {
  if (bias == nullptr) return make_float2(0.f, 0.f);
  return Dtype<T>::to_float2(__ldg(reinterpret_cast<const uint32_t*>(static_cast<const T*>(bias) + col)));
}

template <typename T, bool kActUnsigned, typename Mma>
__global__ void __launch_bounds__(kGemmThreads, Mma::kMinBlocksPerSm)
w4a4_gemm_kernel(const GemmArgs p) {
  float acc[kWarpTilesM][kWarpTilesN][4];
  w4a4_block_acc<T, kActUnsigned, Mma>(p, acc);
  const GemmLane t;
  T* out = static_cast<T*>(p.out);

  // ---------------- epilogue 2: bias, one rounding, guarded stores (N is even: a pair is in or out)
#pragma unroll
  for (int j = 0; j < kWarpTilesN; ++j) {
    const int col = t.warp_col + j * 8 + t.tid * 2;
    if (col >= p.N) continue;
    const float2 bv = load_bias_pair<T>(p.bias, col);
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = t.warp_row + i * 16 + t.gid + 8 * h;
        if (row >= p.M) continue;
        *reinterpret_cast<uint32_t*>(out + static_cast<int64_t>(row) * p.N + col) =
            Dtype<T>::pack2(acc[i][j][2 * h] + bv.x, acc[i][j][2 * h + 1] + bv.y);
      }
    }
  }
}

// ================================================================================================
// Host-side launchers (plain pointers; w4a4_ops.cpp does the tensor checks).

// Calls launch(flavour) with the flavour object of `path`, so that one generic lambda instantiates
// the kernels for every flavour.
template <typename Launch>
static cudaError_t with_mma_flavour(MmaPath path, Launch&& launch) {
  switch (path) {
    case MmaPath::kS8m16n8k32: return launch(MmaS8m16n8k32{});
    case MmaPath::kS4m16n8k64: return launch(MmaS4m16n8k64{});
    case MmaPath::kS4m8n8k32: return launch(MmaS4m8n8k32{});
    case MmaPath::kE2M1S8m16n8k16: return launch(MmaE2M1S8m16n8k16{});
    case MmaPath::kE2M1BlockScaledM16n8k64: return launch(MmaE2M1BlockScaledM16n8k64{});
  }
  return cudaErrorInvalidValue;
}

// Kernel A's plan (the kernel's comment says what the fields mean): two row tiles per block, and the
// segment length that a simple model says is fastest - blocks run in waves of `slots` (2 per SM: 128
// registers and 20 KB of shared memory each; 1 on sm_75), a block's time is about its segment length plus
// a fixed cost of ~2 groups, so time ~ waves x (groups_per_warp + 2). On an H100 that picks the fastest or
// nearly fastest plan of a sweep (.scratch/ka/time_kernel_a.py --sweep: 1, 2 or 4 row tiles per block,
// 1..16 groups per warp) at every FLUX shape, M 256..4608 x K 3072..15360: wave tails otherwise cost up to
// 30% (M = 4608, K = 3072). Two row tiles: the blocks' warps share lora_down reads (L1) in pairs, and
// splits stay few. The plan, hence the order of lora_act's sums, depends on the shape and the GPU's SM
// count: lora_act is the same bit for bit on every run on one GPU model, not across models (neither are
// the tensor cores' own accumulation details).
static QuantizePlan quantize_plan(int M_pad, int K, int R16) {
  const int G = (K + kGroup - 1) / kGroup;
  const int tiles = M_pad / kQuantRows;  // a multiple of 8: M_pad is one of kGemmBlockM
  int device = 0, sms = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || sms <= 0)
    sms = 132, major = 9;  // the launch reports the error
  const int64_t slots = static_cast<int64_t>(sms) * (major >= 8 ? 2 : 1);

  // Blocks of 2 row tiles x 4 segments or 1 x 8; among plans of equal modelled cost the one with fewer
  // splits (fewer partial sums to write and add). Measured on an H100 (2026-11-22), kernel A alone: 1 x 8
  // took 14.1 instead of 16.3 us at M = 512, K = 3072, 25.0 instead of 27.0 at 512 x 12288, 34.2 instead
  // of 37.1 at 4096 x 3072; the rule keeps 2 x 4 where that measured faster (4608 x 15360: 165 us).
  QuantizePlan p;
  int64_t best_cost = -1;
  for (const int tiles_per_block : {2, 1}) {
    const int row_blocks = tiles / tiles_per_block;
    const int segments_per_block = kQuantWarps / tiles_per_block;
    int previous_splits = 0;
    for (int s = 1; s <= std::min(G, kQuantMaxGroupsPerWarp); ++s) {
      const int splits = ((G + s - 1) / s + segments_per_block - 1) / segments_per_block;
      if (splits == previous_splits) continue;  // the same blocks with longer segments: never better
      previous_splits = splits;
      const int64_t waves = (static_cast<int64_t>(row_blocks) * splits + slots - 1) / slots;
      const int64_t cost = waves * (s + kQuantBlockCostGroups);
      if (best_cost < 0 || cost < best_cost || (cost == best_cost && splits < p.splits)) {
        best_cost = cost;
        p.tiles_per_block = tiles_per_block;
        p.row_blocks = row_blocks;
        p.groups_per_warp = s;
        p.splits = splits;
      }
    }
  }
  p.partial_floats = p.splits > 1 && R16 > 0 ? static_cast<int64_t>(p.splits) * M_pad * R16 : 0;
  return p;
}

void quantize_workspace(int M_pad, int K, int R16, int64_t* partial_floats, int* counters) {
  const QuantizePlan plan = quantize_plan(M_pad, K, R16);
  *partial_floats = plan.partial_floats;
  *counters = plan.partial_floats > 0 ? plan.row_blocks : 0;
}

template <typename T, bool U, typename Layout>
static cudaError_t launch_quantize_typed(const QuantizeArgs& a, cudaStream_t stream) {
  const QuantizePlan plan = quantize_plan(a.M_pad, a.K, a.R16);
  if (plan.partial_floats > 0 && (a.lora_partials == nullptr || a.counters == nullptr)) return cudaErrorInvalidValue;
  const int64_t blocks = static_cast<int64_t>(plan.row_blocks) * plan.splits;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  // E2M1 codes are signed: an unsigned request (refused by the bindings) maps to the one E2M1 kernel.
  quantize_act_lora_down_kernel<T, U && !kE2M1Codes<Layout>, Layout>
      <<<static_cast<unsigned>(blocks), kQuantThreads, 0, stream>>>(a, plan);
  return cudaGetLastError();
}

cudaError_t launch_quantize_act_lora_down(const QuantizeArgs& a, bool input_is_bf16, bool act_unsigned, MmaPath path,
                                          cudaStream_t stream) {
  return with_mma_flavour(path, [&](auto mma) {
    using Layout = typename decltype(mma)::Layout;  // the three INT4 flavours share one instantiation
    if (input_is_bf16)
      return act_unsigned ? launch_quantize_typed<__nv_bfloat16, true, Layout>(a, stream)
                          : launch_quantize_typed<__nv_bfloat16, false, Layout>(a, stream);
    return act_unsigned ? launch_quantize_typed<__half, true, Layout>(a, stream)
                        : launch_quantize_typed<__half, false, Layout>(a, stream);
  });
}

cudaError_t launch_quantize_act_e4m3(const QuantizeArgs& a, bool input_is_bf16, bool act_unsigned,
                                     cudaStream_t stream) {
  if (a.K % kGroup) return cudaErrorInvalidValue;
  if (input_is_bf16)
    return act_unsigned ? launch_quantize_typed<__nv_bfloat16, true, Lane16E4M3Layout>(a, stream)
                        : launch_quantize_typed<__nv_bfloat16, false, Lane16E4M3Layout>(a, stream);
  return act_unsigned ? launch_quantize_typed<__half, true, Lane16E4M3Layout>(a, stream)
                      : launch_quantize_typed<__half, false, Lane16E4M3Layout>(a, stream);
}

static dim3 gemm_grid(const GemmArgs& a) {
  return dim3((a.N + kGemmBlockN - 1) / kGemmBlockN, a.M_pad / kGemmBlockM);
}

template <typename T, bool U, typename Mma>
static cudaError_t launch_gemm_typed(const GemmArgs& a, cudaStream_t stream) {
  w4a4_gemm_kernel<T, U && !kE2M1Codes<Mma>, Mma><<<gemm_grid(a), kGemmThreads, 0, stream>>>(a);  // as above
  return cudaGetLastError();
}

cudaError_t launch_w4a4_gemm(const GemmArgs& a, bool is_bf16, bool act_unsigned, MmaPath path, cudaStream_t stream) {
  return with_mma_flavour(path, [&](auto mma) {
    using Mma = decltype(mma);
    if (is_bf16)
      return act_unsigned ? launch_gemm_typed<__nv_bfloat16, true, Mma>(a, stream)
                          : launch_gemm_typed<__nv_bfloat16, false, Mma>(a, stream);
    return act_unsigned ? launch_gemm_typed<__half, true, Mma>(a, stream)
                        : launch_gemm_typed<__half, false, Mma>(a, stream);
  });
}

}  // namespace svdq

// The MLP variant of kernel B (fc1 with GELU and the quantization of fc2's input in its epilogue).
#include "w4a4_mlp.cuh"
