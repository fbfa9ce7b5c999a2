// SVDQuant W4A4 linear for the INT8 tensor-core path (sm_80 and later; THE path on sm_90).
//
//   y[m,n] = sum_g (sum_{k in g} qx[m,k] * qw[n,k]) * sx[m,g] * sw[g,n]    int32 per group, fp32 sum
//          + sum_r lora_act[m,r] * lora_up[n,r]                            low-rank branch, fp32
//          + bias[n]
//
// Two kernels (DESIGN.md §2, §4):
//   A  quantize_act_lora_down_kernel   one read of x: smooth, per-row 64-group scales, 4-bit codes
//                                      packed straight into the GEMM's register-fragment layout,
//                                      and lora_act = x . lora_down^T in fp32.
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
// The GEMM is one template over the MMA flavour (a policy struct: its packed layout, how a packed
// word becomes fragment registers, and the group's MMA chain); kernel A is a template over the
// flavour's layout. The host picks the flavour per GPU (MmaPath in w4a4_int8.h):
//   MmaS8m16n8k32  (below; interleaved-nibble layout)   sm_90, sm_120 and newer
//   MmaS4m16n8k64  (w4a4_s4.cuh; native s4 layout)      sm_80, sm_86, sm_89
//   MmaS4m8n8k32   (w4a4_s4.cuh; native s4 layout)      sm_75
//   MmaE2M1S8m16n8k16 (w4a4_nvfp4.cuh; NVFP4 files: 16-wide groups, E2M1 codes)  sm_80 .. sm_90
//   MmaE2M1BlockScaledM16n8k64 (w4a4_nvfp4_bs.cuh; NVFP4 on the block-scaled FP4 MMA)  sm_120
// All but the last give the same group sums, hence the same outputs bit for bit; the block-scaled
// MMA accumulates scaled products in fp32 in the tensor core (w4a4_nvfp4_bs.cuh says what differs).
//
// This file holds no torch headers on purpose: it is compiled once per target arch, and keeping it
// small keeps the all-arch build short. Tensor checks and allocation live in w4a4_ops.cpp.
//
// ------------------------------------------------------------------------------------------------
// The interleaved-nibble fragment layout of the INT8 flavour (shared by the activation packer in
// kernel A and the weight repack done once at load in nunchaku_ext/backends/cuda.py; the two MUST
// agree, tests check both against the spec). The s4 flavours' layout is in w4a4_s4.cuh.
//
// mma.sync.m16n8k32 .s8 register fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32"), with
// lane = 4*gid + tid (gid = lane/4 in 0..7, tid = lane%4 in 0..3):
//   A (16x32, row-major)  a0: row gid,   k tid*4+0..3      a1: row gid+8, k tid*4+0..3
//                         a2: row gid,   k 16+tid*4+0..3   a3: row gid+8, k 16+tid*4+0..3
//   B (32x8, "col")       b0: col gid,   k tid*4+0..3      b1: col gid,   k 16+tid*4+0..3
//   C (16x8, int32)       c0,c1: row gid, cols 2*tid, 2*tid+1   c2,c3: row gid+8, same cols
// Each register holds 4 int8 values, byte b = k offset b.
//
// A packed 32-bit word holds 8 nibbles and expands to TWO such registers:
//   low  register, byte b = nibble 2b     ((word     ) & 0x0F0F0F0F)
//   high register, byte b = nibble 2b+1   ((word >> 4) & 0x0F0F0F0F)
// so unpacking is two ANDs (plus a sign extension for signed codes) and no byte shuffling.
//
// Activations, one 16-row tile (mt) and one 64-group (g) = 32 lanes x 16 bytes (uint4, words w0..w3):
//   word j (0..3) -> low = A reg for rows gid   (k = g*64 + 16*j + tid*4 + b)
//                    high = A reg for rows gid+8 (same k)
//   i.e. words 0,1 are {a0,a1},{a2,a3} of the first k32 MMA, words 2,3 those of the second.
//   Address: act_packed[(mt * G + g) * 32 + lane]  (uint4) - a warp reads 512 contiguous bytes.
//
// Weights, one pair of 8-column tiles (p covers cols 16p..16p+15) and one group g = 32 lanes x uint4:
//   word 2*t + v  (t = tile of the pair, v = which k32 MMA of the group)
//        low  = b0 of col 16p + 8t + gid, k = g*64 + 32v + tid*4 + b
//        high = b1 of the same col,       k = g*64 + 32v + 16 + tid*4 + b
//   Address: wgt_packed[(p * G + g) * 32 + lane].
//
// Scales are fp32 and stored group-major so that a warp's loads for one group are contiguous:
//   act_scales[g * M_pad + m], wgt_scales[g * N_pad + n].
// Low-rank operands are fp32, rank padded with zeros to R16 (a multiple of 16):
//   lora_act[m * R16 + r], lora_up[n * R16 + r].
// M_pad and N_pad are multiples of the GEMM block tile (128); padded rows hold zero codes/scales,
// padded weight columns zero codes/scales/bias, so the main loop needs no bounds checks.
// ------------------------------------------------------------------------------------------------

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "w4a4_int8.h"
#include "w4a4_s4.cuh"
#include "w4a4_nvfp4.cuh"
#include "w4a4_nvfp4_bs.cuh"

namespace svdq {

// ------------------------------------------------------------------------------------------------
// Small helpers

template <typename T> struct Dtype;
template <> struct Dtype<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo (lower address)
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Dtype<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

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

// Where kernel A puts the 32 codes a lane packs per 16x64 group, for a layout L. For each of its two
// rows (h = 0: row gid, h = 1: row gid+8) a lane holds four runs of 4 consecutive k; run j starts at
// L::run_k(j, tid) within the group, and code b of run j goes to bits L::shift(j, b, h) of word
// L::word(j, h) of the lane's uint4. This one is the interleaved layout described above.
struct InterleavedNibbleLayout {
  static __device__ __forceinline__ int run_k(int j, int tid) { return 16 * j + 4 * tid; }
  static __device__ __forceinline__ int word(int j, int /*h*/) { return j; }
  static __device__ __forceinline__ int shift(int /*j*/, int b, int h) { return 8 * b + 4 * h; }
};

// The INT8 flavour: nibbles expanded to int8 registers, two k32 MMAs per group. Unsigned codes
// [0, 15] are non-negative int8, so s8.s8 serves both activation kinds.
struct MmaS8m16n8k32 {
  using Layout = InterleavedNibbleLayout;
  static constexpr int kMinBlocksPerSm = 0;  // __launch_bounds__: 0 leaves the register budget to ptxas
  struct AFrag { uint32_t k32[2][4]; };  // the A registers of the group's two k32 MMAs
  struct BFrag { uint32_t k32[2][2]; };  // b0, b1 of each
  template <bool kActUnsigned>
  static __device__ __forceinline__ AFrag a_frag(uint4 w) {
    AFrag f;
    unpack_nibbles_to_s8<kActUnsigned>(w.x, f.k32[0][0], f.k32[0][1]);
    unpack_nibbles_to_s8<kActUnsigned>(w.y, f.k32[0][2], f.k32[0][3]);
    unpack_nibbles_to_s8<kActUnsigned>(w.z, f.k32[1][0], f.k32[1][1]);
    unpack_nibbles_to_s8<kActUnsigned>(w.w, f.k32[1][2], f.k32[1][3]);
    return f;
  }
  static __device__ __forceinline__ BFrag b_frag(uint32_t w0, uint32_t w1) {  // weights are signed
    BFrag f;
    unpack_nibbles_to_s8<false>(w0, f.k32[0][0], f.k32[0][1]);
    unpack_nibbles_to_s8<false>(w1, f.k32[1][0], f.k32[1][1]);
    return f;
  }
  template <bool kActUnsigned>
  static __device__ __forceinline__ void group_dot(int32_t (&sum)[4], const AFrag& a, const BFrag& b) {
    mma_s8_m16n8k32(sum, a.k32[0], b.k32[0][0], b.k32[0][1]);
    mma_s8_m16n8k32(sum, a.k32[1], b.k32[1][0], b.k32[1][1]);
  }
};

// Kernel A's quantizer for one 64-column chunk of a lane's two rows, shared with the MLP kernel
// (w4a4_mlp.cuh). xs[h][j][b] is the smoothed value of row half h at k = Layout::run_k(j, tid) + b;
// the 4 lanes of a gid hold the rows' chunk between them, so all 32 lanes must call it together.
// Out: the lane's packed words, and per row half the scale of scale group tid.
template <bool kUnsigned, typename Layout>
__device__ __forceinline__ void quantize_lane_chunk(const float (&xs)[2][4][4], int tid, uint32_t (&words)[4],
                                                    float (&my_scale)[2]) {
  // Per step (INT4: the whole 64-group; NVFP4: 16-groups, see quant_steps in w4a4_nvfp4.cuh) and row
  // half: the scale of the lane's group, then the codes of its runs. One group at a time keeps few
  // values live.
  words[0] = words[1] = words[2] = words[3] = 0u;
  my_scale[0] = my_scale[1] = 0.f;  // the scale this lane stores per row half: scale group tid
#pragma unroll
  for (int t = 0; t < quant_steps<Layout>(); ++t) {
    float scale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
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
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (quant_step<Layout>(j) != t) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          uint32_t nibble;
          if constexpr (kE2M1Codes<Layout>) {
            nibble = e2m1_code(xs[h][j][b], scale[h]);
          } else {
            // code = round_half_even(xs / scale) (IEEE division), clamped; scale 0 -> code 0.
            float q = 0.f;
            if (scale[h] > 0.f) {
              q = rintf(__fdiv_rn(xs[h][j][b], scale[h]));
              q = kUnsigned ? fminf(fmaxf(q, 0.f), 15.f) : fminf(fmaxf(q, -7.f), 7.f);
            }
            nibble = static_cast<uint32_t>(static_cast<int>(q)) & 0xFu;
          }
          words[Layout::word(j, h)] |= nibble << Layout::shift(j, b, h);
        }
      }
    }
  }
}

// ================================================================================================
// Kernel A: activation quantization + low-rank down projection.
//
// One block owns 16 rows (one m16 tile) and walks K in chunks of 8 groups (512 columns):
//   phase 1  warp w quantizes group (chunk + w) of the 16 rows. Lane (gid, tid) loads exactly the
//            32 values it must pack (rows gid and gid+8, k = Layout::run_k(j, tid) + b: the GEMM
//            flavour's layout), so the packed word is built in registers and stored as one
//            coalesced 16-byte write per lane. The 4 lanes
//            sharing a gid hold one row's group between them: a 2-step shuffle gives the absmax.
//            The raw x values also go to shared memory for phase 2.
//   phase 2  warp w computes the chunk's partial x . lora_down[r]^T for ranks r = w, w+8, ...:
//            lanes split the chunk's columns, a butterfly shuffle sums each of the 16 rows, and
//            lane m adds row m's partial to the block's fp32 accumulator in shared memory.
// x is read from global memory exactly once.
// ================================================================================================

constexpr int kQuantRows = 16;
constexpr int kQuantWarps = 8;
constexpr int kQuantThreads = kQuantWarps * 32;
constexpr int kQuantChunkGroups = kQuantWarps;          // one group per warp per chunk
constexpr int kQuantChunkK = kQuantChunkGroups * kGroup;  // 512 columns
constexpr int kQuantSmemPad = 8;                          // elements; keeps rows 16-byte aligned

template <typename InT, bool kUnsigned, typename Layout>
__global__ void __launch_bounds__(kQuantThreads)
quantize_act_lora_down_kernel(const InT* __restrict__ x, int64_t ldx, const float* __restrict__ smooth,
                              const float* __restrict__ lora_down, int M, int K, int M_pad, int R, int R16,
                              uint4* __restrict__ act_packed, float* __restrict__ act_scales,
                              float* __restrict__ lora_act) {
  extern __shared__ float lora_acc[];  // [R][16]: this block's x . lora_down^T, fp32
  __shared__ __align__(16) InT x_raw[kQuantRows][kQuantChunkK + kQuantSmemPad];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tid = lane % 4;
  const int mtile = blockIdx.x;
  const int row_base = mtile * kQuantRows;
  const int G = (K + kGroup - 1) / kGroup;  // NVFP4: K is a multiple of 16; the last chunk is zero-padded
  constexpr int kScaleGroups = ScaleGroupsOf<Layout>::value;  // per 64 columns: 1 (INT4) or 4 (NVFP4)

  for (int i = threadIdx.x; i < R * kQuantRows; i += kQuantThreads) lora_acc[i] = 0.f;

  // The two rows this lane quantizes; rows past M are padding and quantize as zeros (codes 0,
  // scale 0, lora_act 0) - NOT as the shifted value, which would be non-zero for unsigned input.
  const int rows[2] = {row_base + gid, row_base + gid + 8};
  const bool row_valid[2] = {rows[0] < M, rows[1] < M};

  for (int g0 = 0; g0 < G; g0 += kQuantChunkGroups) {
    const int chunk_groups = min(kQuantChunkGroups, G - g0);

    // ---------------- phase 1: quantize one 16x64 group per warp
    if (warp < chunk_groups) {
      const int g = g0 + warp;
      float xs[2][4][4];  // [row half][run j][b]: smoothed values at k = g*64 + Layout::run_k(j, tid) + b
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = g * kGroup + Layout::run_k(j, tid);
        const bool k_valid = k < K;  // a run of 4 never straddles K (a multiple of 16)
        const float4 sm = k_valid ? *reinterpret_cast<const float4*>(smooth + k) : make_float4(1.f, 1.f, 1.f, 1.f);
        const float smv[4] = {sm.x, sm.y, sm.z, sm.w};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint2 raw = make_uint2(0u, 0u);  // 4 values of InT (2 bytes each)
          if (row_valid[h] && k_valid) raw = __ldg(reinterpret_cast<const uint2*>(x + rows[h] * ldx + k));
          *reinterpret_cast<uint2*>(&x_raw[gid + 8 * h][warp * kGroup + Layout::run_k(j, tid)]) = raw;
          const InT* v = reinterpret_cast<const InT*>(&raw);
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            // Spec (numerics.smooth_input): fp32 add of the shift, then IEEE fp32 division.
            float xf = Dtype<InT>::to_float(v[b]);
            if (kUnsigned) xf = __fadd_rn(xf, 0.171875f);
            xs[h][j][b] = row_valid[h] ? __fdiv_rn(xf, smv[b]) : 0.f;
          }
        }
      }

      uint32_t words[4];
      float my_scale[2];
      quantize_lane_chunk<kUnsigned, Layout>(xs, tid, words, my_scale);
      act_packed[(static_cast<int64_t>(mtile) * G + g) * 32 + lane] = make_uint4(words[0], words[1], words[2], words[3]);
      // Every lane of a row computed all its scales; lane tid stores scale group tid.
      if (tid < kScaleGroups) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
          act_scales[(static_cast<int64_t>(g) * kScaleGroups + tid) * M_pad + rows[h]] = my_scale[h];
      }
    }
    __syncthreads();  // x_raw complete

    // ---------------- phase 2: partial low-rank down product over this chunk
    const int chunk_k = min(chunk_groups * kGroup, K - g0 * kGroup);
    for (int r = warp; r < R; r += kQuantWarps) {
      // Lane covers chunk columns lane*8 .. +7 and 256 + lane*8 .. +7 (chunk_k is a multiple of 16,
      // so a lane's 8 columns are all in range or all out).
      float d[2][8];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = half * 256 + lane * 8;
        if (c < chunk_k) {
          const float4* src = reinterpret_cast<const float4*>(lora_down + static_cast<int64_t>(r) * K + g0 * kGroup + c);
          const float4 d0 = __ldg(src), d1 = __ldg(src + 1);
          d[half][0] = d0.x; d[half][1] = d0.y; d[half][2] = d0.z; d[half][3] = d0.w;
          d[half][4] = d1.x; d[half][5] = d1.y; d[half][6] = d1.z; d[half][7] = d1.w;
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) d[half][e] = 0.f;
        }
      }
      float mine = 0.f;  // lane m (< 16) keeps row m's chunk sum
#pragma unroll 4
      for (int m = 0; m < kQuantRows; ++m) {
        float p = 0.f;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int c = half * 256 + lane * 8;
          if (c < chunk_k) {
            const uint4 raw = *reinterpret_cast<const uint4*>(&x_raw[m][c]);
            const InT* v = reinterpret_cast<const InT*>(&raw);
#pragma unroll
            for (int e = 0; e < 8; ++e) p = fmaf(Dtype<InT>::to_float(v[e]), d[half][e], p);
          }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) p += __shfl_xor_sync(0xffffffffu, p, off);
        if (lane == m) mine = p;
      }
      if (lane < kQuantRows) lora_acc[r * kQuantRows + lane] += mine;  // only warp (r % 8) owns rank r
    }
    __syncthreads();  // x_raw reused by the next chunk; lora_acc visible at the end
  }

  for (int i = threadIdx.x; i < kQuantRows * R16; i += kQuantThreads) {
    const int m = i / R16, r = i % R16;
    lora_act[static_cast<int64_t>(row_base + m) * R16 + r] = r < R ? lora_acc[r * kQuantRows + m] : 0.f;
  }
}

// ================================================================================================
// Kernel B: W4A4 GEMM, integer tensor cores (flavour Mma), fused epilogue.
//
// Block tile 128 x 128, 8 warps as 4 (rows) x 2 (cols); warp tile 32 x 64 = 2 x 8 mma tiles.
// Per 64-group every warp loads its fragments straight from global memory (the packed layouts make
// each a 16-byte coalesced load; warps sharing a row/col band hit L1), double-buffered in registers:
// group g+1 is in flight while group g is multiplied. Per group and 16x8 tile: the flavour's MMA
// chain over the 64 k (INT8: two k32 MMAs; s4: one k64, or four m8n8k32 on Turing) into a zeroed
// int32 accumulator (exact), then acc += (float(sum) * sx) * sw in fp32, the spec's order.
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

// The block's fp32 results before the bias, in the lanes' accumulators (GemmLane): the quantized
// branch, NVFP4's factors, the low-rank branch. Shared by w4a4_gemm_kernel and the MLP's fc1 kernel
// (w4a4_mlp.cuh), which differ only in what their epilogue does with it.
template <bool kActUnsigned, typename Mma>
__device__ __forceinline__ void w4a4_block_acc(const uint4* __restrict__ act_packed, const float* __restrict__ act_scales,
                                               const float* __restrict__ lora_act, const uint4* __restrict__ wgt_packed,
                                               const float* __restrict__ wgt_scales, const float* __restrict__ lora_up,
                                               int M_pad, int N_pad, int G, int R16, float alpha,
                                               const float* __restrict__ channel_scale,
                                               float (&acc)[kWarpTilesM][kWarpTilesN][4]) {
  constexpr int kScaleGroups = ScaleGroupsOf<Mma>::value;  // per 64-k chunk: 1 (INT4) or 4 (NVFP4)
  const GemmLane t;
  const int lane = t.lane, gid = t.gid, tid = t.tid, warp_m = t.warp_m, warp_n = t.warp_n;
  const int block_row = t.block_row, block_col = t.block_col, warp_row = t.warp_row, warp_col = t.warp_col;

  // Per-lane streams, advanced by 32 uint4 per group.
  const uint4* a_src = act_packed + (static_cast<int64_t>(warp_row / 16) * G) * 32 + lane;
  const uint4* b_src = wgt_packed + (static_cast<int64_t>(warp_col / 16) * G) * 32 + lane;
  const int64_t a_tile_stride = static_cast<int64_t>(G) * 32;  // next m16 tile / next n16 pair

#pragma unroll
  for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  uint4 a_cur[kWarpTilesM], b_cur[kWarpTilesN / 2];
#pragma unroll
  for (int i = 0; i < kWarpTilesM; ++i) a_cur[i] = __ldg(a_src + i * a_tile_stride);
#pragma unroll
  for (int p = 0; p < kWarpTilesN / 2; ++p) b_cur[p] = __ldg(b_src + p * a_tile_stride);

  for (int g = 0; g < G; ++g) {
    // Prefetch group g+1 (the last iteration re-reads group g: harmless, and branch-free).
    const int g_next = min(g + 1, G - 1);
    uint4 a_next[kWarpTilesM], b_next[kWarpTilesN / 2];
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) a_next[i] = __ldg(a_src + i * a_tile_stride + g_next * 32);
#pragma unroll
    for (int p = 0; p < kWarpTilesN / 2; ++p) b_next[p] = __ldg(b_src + p * a_tile_stride + g_next * 32);

    // The packed words as the flavour's fragment registers (INT8: nibbles expanded to bytes), once
    // per group and tile, outside the i x j MMA loop. A pair's words 0,1 belong to its first n8 tile.
    typename Mma::AFrag a_frag[kWarpTilesM];
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) a_frag[i] = Mma::template a_frag<kActUnsigned>(a_cur[i]);
    typename Mma::BFrag b_frag[kWarpTilesN];
#pragma unroll
    for (int p = 0; p < kWarpTilesN / 2; ++p) {
      b_frag[2 * p] = Mma::b_frag(b_cur[p].x, b_cur[p].y);
      b_frag[2 * p + 1] = Mma::b_frag(b_cur[p].z, b_cur[p].w);
    }

    if constexpr (kBlockScaled<Mma>) {
      // sm_120 NVFP4: per m16 tile the scale register of row gid + 8(tid%2), per n8 tile that of
      // column gid (w4a4_nvfp4_bs.cuh: lanes tid 0 / 1 supply them), then one block-scaled MMA per
      // 16x8 tile straight into the fp32 accumulator.
      const int64_t sg = static_cast<int64_t>(g) * kScaleGroups;
      uint32_t sfa[kWarpTilesM], sfb[kWarpTilesN];
#pragma unroll
      for (int i = 0; i < kWarpTilesM; ++i)
        sfa[i] = Mma::scale_reg(act_scales + sg * M_pad + warp_row + i * 16 + gid + 8 * (tid & 1), M_pad);
#pragma unroll
      for (int j = 0; j < kWarpTilesN; ++j)
        sfb[j] = Mma::scale_reg(wgt_scales + sg * N_pad + warp_col + j * 8 + gid, N_pad);
#pragma unroll
      for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kWarpTilesN; ++j) Mma::mma(acc[i][j], a_frag[i], b_frag[j], sfa[i], sfb[j]);
    } else {
      // Per scale group (INT4: the 64-group; NVFP4: each of its four 16-groups): its scales, sx for the
      // lane's 4 rows and sw for its 16 columns, then per 16x8 tile its exact integer dot product.
#pragma unroll
      for (int s = 0; s < kScaleGroups; ++s) {
        const int64_t sg = static_cast<int64_t>(g) * kScaleGroups + s;
        float sx[kWarpTilesM][2];
#pragma unroll
        for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) sx[i][h] = __ldg(act_scales + sg * M_pad + warp_row + i * 16 + gid + 8 * h);
        float2 sw[kWarpTilesN];
#pragma unroll
        for (int j = 0; j < kWarpTilesN; ++j)
          sw[j] = __ldg(reinterpret_cast<const float2*>(wgt_scales + sg * N_pad + warp_col + j * 8 + tid * 2));
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
    for (int i = 0; i < kWarpTilesM; ++i) a_cur[i] = a_next[i];
#pragma unroll
    for (int p = 0; p < kWarpTilesN / 2; ++p) b_cur[p] = b_next[p];
  }

  // NVFP4: the per-tensor and per-channel factors on the quantized branch's sum, in the spec's order
  // (acc * (wtscale / 4) * wcscales[n]). The block-scaled MMA sums E2M1 values, not twice them: its
  // sum is times 4 (exact) first, folded into alpha (4 * alpha is exact too, so the product is the same).
  if constexpr (kE2M1Codes<Mma>) {
    if constexpr (kBlockScaled<Mma>) alpha *= 4.f;
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j) {
      const float2 cs = __ldg(reinterpret_cast<const float2*>(channel_scale + warp_col + j * 8 + tid * 2));
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
  if (R16 > 0) {
    // [rank][row] and [rank][col]: a lane reads 4 rows (gid varies: 8 banks) and 8 float2 columns.
    __shared__ __align__(16) float la_s[kLoraChunk][kGemmBlockM + 4];
    __shared__ __align__(16) float up_s[kLoraChunk][kGemmBlockN + 4];
    for (int r0 = 0; r0 < R16; r0 += kLoraChunk) {
      __syncthreads();
      for (int e = threadIdx.x; e < kLoraChunk * kGemmBlockM; e += kGemmThreads) {
        const int row = e / kLoraChunk, r = e % kLoraChunk;
        la_s[r][row] = __ldg(lora_act + static_cast<int64_t>(block_row + row) * R16 + r0 + r);
      }
      for (int e = threadIdx.x; e < kLoraChunk * kGemmBlockN; e += kGemmThreads) {
        const int col = e / kLoraChunk, r = e % kLoraChunk;
        up_s[r][col] = __ldg(lora_up + static_cast<int64_t>(block_col + col) * R16 + r0 + r);
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

template <typename OutT, bool kActUnsigned, typename Mma>
__global__ void __launch_bounds__(kGemmThreads, Mma::kMinBlocksPerSm)
w4a4_gemm_kernel(const uint4* __restrict__ act_packed, const float* __restrict__ act_scales,
                 const float* __restrict__ lora_act, const uint4* __restrict__ wgt_packed,
                 const float* __restrict__ wgt_scales, const float* __restrict__ lora_up,
                 const float* __restrict__ bias, OutT* __restrict__ out, int M, int N, int M_pad, int N_pad,
                 int G, int R16, float alpha, const float* __restrict__ channel_scale) {
  float acc[kWarpTilesM][kWarpTilesN][4];
  w4a4_block_acc<kActUnsigned, Mma>(act_packed, act_scales, lora_act, wgt_packed, wgt_scales, lora_up, M_pad, N_pad,
                                    G, R16, alpha, channel_scale, acc);
  const GemmLane t;
  const int gid = t.gid, tid = t.tid, warp_row = t.warp_row, warp_col = t.warp_col;

  // ---------------- epilogue 2: bias, one rounding, guarded stores
  const bool pair_aligned = (N % 2) == 0;  // then (row*N + even col) is even: 4-byte stores
#pragma unroll
  for (int j = 0; j < kWarpTilesN; ++j) {
    const int col = warp_col + j * 8 + tid * 2;
    const float2 bv = *reinterpret_cast<const float2*>(bias + col);  // bias padded to N_pad
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = warp_row + i * 16 + gid + 8 * h;
        if (row >= M) continue;
        const float v0 = acc[i][j][2 * h] + bv.x, v1 = acc[i][j][2 * h + 1] + bv.y;
        OutT* dst = out + static_cast<int64_t>(row) * N + col;
        if (pair_aligned && col + 1 < N) {
          *reinterpret_cast<uint32_t*>(dst) = Dtype<OutT>::pack2(v0, v1);
        } else {
          if (col < N) dst[0] = Dtype<OutT>::from_float(v0);
          if (col + 1 < N) dst[1] = Dtype<OutT>::from_float(v1);
        }
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

constexpr int kQuantStaticSmem = kQuantRows * (kQuantChunkK + kQuantSmemPad) * 2;  // x_raw, 2-byte input

cudaError_t quantize_max_rank(int device, int* max_rank) {
  int smem_optin = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  *max_rank = (smem_optin - kQuantStaticSmem) / static_cast<int>(kQuantRows * sizeof(float));
  return e;
}

template <typename T, bool U, typename Layout>
static cudaError_t launch_quantize_typed(const QuantizeArgs& a, cudaStream_t stream) {
  const size_t dyn_smem = static_cast<size_t>(a.R) * kQuantRows * sizeof(float);
  // E2M1 codes are signed: an unsigned request (refused by the bindings) maps to the one E2M1 kernel.
  auto kernel = quantize_act_lora_down_kernel<T, U && !kE2M1Codes<Layout>, Layout>;
  static_assert(sizeof(T) * kQuantRows * (kQuantChunkK + kQuantSmemPad) == kQuantStaticSmem, "x_raw size");
  if (dyn_smem > 0) {
    // Static x_raw takes 16.6 KB; allow the rank accumulator past the 48 KB default when needed.
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn_smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<a.M_pad / kQuantRows, kQuantThreads, dyn_smem, stream>>>(
      static_cast<const T*>(a.x), a.ldx, a.smooth, a.lora_down, a.M, a.K, a.M_pad, a.R, a.R16,
      static_cast<uint4*>(a.act_packed), a.act_scales, a.lora_act);
  return cudaGetLastError();
}

cudaError_t launch_quantize_act_lora_down(const QuantizeArgs& a, bool input_is_bf16, bool act_unsigned, MmaPath path,
                                          cudaStream_t stream) {
  return with_mma_flavour(path, [&](auto mma) {
    using Layout = typename decltype(mma)::Layout;  // both s4 flavours share one instantiation
    if (input_is_bf16)
      return act_unsigned ? launch_quantize_typed<__nv_bfloat16, true, Layout>(a, stream)
                          : launch_quantize_typed<__nv_bfloat16, false, Layout>(a, stream);
    return act_unsigned ? launch_quantize_typed<__half, true, Layout>(a, stream)
                        : launch_quantize_typed<__half, false, Layout>(a, stream);
  });
}

template <typename T, bool U, typename Mma>
static cudaError_t launch_gemm_typed(const GemmArgs& a, cudaStream_t stream) {
  const dim3 grid(a.N_pad / kGemmBlockN, a.M_pad / kGemmBlockM);
  w4a4_gemm_kernel<T, U && !kE2M1Codes<Mma>, Mma><<<grid, kGemmThreads, 0, stream>>>(  // as above
      static_cast<const uint4*>(a.act_packed), a.act_scales, a.lora_act, static_cast<const uint4*>(a.wgt_packed),
      a.wgt_scales, a.lora_up, a.bias, static_cast<T*>(a.out), a.M, a.N, a.M_pad, a.N_pad, a.G, a.R16, a.alpha,
      a.channel_scale);
  return cudaGetLastError();
}

cudaError_t launch_w4a4_gemm(const GemmArgs& a, bool output_is_bf16, bool act_unsigned, MmaPath path,
                             cudaStream_t stream) {
  return with_mma_flavour(path, [&](auto mma) {
    using Mma = decltype(mma);
    if (output_is_bf16)
      return act_unsigned ? launch_gemm_typed<__nv_bfloat16, true, Mma>(a, stream)
                          : launch_gemm_typed<__nv_bfloat16, false, Mma>(a, stream);
    return act_unsigned ? launch_gemm_typed<__half, true, Mma>(a, stream)
                        : launch_gemm_typed<__half, false, Mma>(a, stream);
  });
}

}  // namespace svdq

// The MLP variant of kernel B (fc1 with GELU and the quantization of fc2's input in its epilogue).
#include "w4a4_mlp.cuh"
