// NVFP4 W4A4 on the INT8 tensor cores (sm_80 to sm_90; THE NVFP4 path on sm_90, which has no FP4
// MMA; sm_120 uses its block-scaled FP4 MMA, w4a4_nvfp4_bs.cuh): a GEMM flavour and a kernel-A layout
// for w4a4_int8.cu's kernels (templates over both).
//
// Numerics (numerics.quantize_act_nvfp4 / reference.quantized_branch): E2M1 values times two are the
// integers 0, ±1, ±2, ±3, ±4, ±6, ±8, ±12, exact in int8. Groups are 16 wide along K, so every
// 16-group gets its own MMA, mma.sync m16n8k16 .s8 (one group's dot product, |sum| <= 16*12*12,
// exact in int32), and its own rescale by the two FP8-E4M3 group scales (converted to fp32, exact); the
// kernel multiplies the fp32 sum by alpha = wtscale / 4 and then by wcscales[n] once at the end, as
// the spec does.
//
// Layout (E2M1Layout; the layout interface is in w4a4_int8.cu): run j of lane tid is k 16j + 4tid + 0..3,
// i.e. in every 16-group s the lane owns k 16s + 4tid + b - what m16n8k16 .s8 wants (PTX "Matrix
// Fragments for mma.m16n8k16", integer types): A = {a0: row gid, a1: row gid+8} at k tid*4 + b,
// B = {b0: col gid, k tid*4 + b}. In memory a run is 2 bytes (byte 8s + 2tid of the row's 32-byte
// chunk), so a lane's row is four 2-byte accesses; the 16 bits of a run are the 4 selectors of one PRMT
// (e2m1x4_to_s8x4). K (a multiple of 16) ends inside a chunk when it is not a multiple of 64: the
// GEMM does not read weight runs past K, and kernel A writes zero codes and scales there.
// Activation scales are [K64/16][M_pad] fp32; weight scales are the file's E4M3 [K/16][N].
#pragma once
#include <cuda_fp8.h>
#include <stdint.h>

#include <type_traits>

namespace svdq {

// Kernel A's and the GEMM's runs for NVFP4 codes (the layout interface: w4a4_int8.cu).
struct E2M1Layout {
  static constexpr int kScaleGroups = 4;  // 16-wide scale groups per 64-column chunk
  static constexpr int kAdjacentRuns = 1;
  static __host__ __device__ __forceinline__ constexpr int run_k(int j, int tid) { return 16 * j + 4 * tid; }
  // Kernel A quantizes one 16-group per step: run j (all 4 lanes of a gid) is 16-group j.
  static constexpr int kQuantSteps = 4;
  static constexpr int kGroupLanes = 4;  // lanes of a gid holding one step's group of a row
  static __host__ __device__ constexpr int quant_step(int j) { return j; }
};

// Scale groups per 64-column chunk of a layout or GEMM flavour: 4 for NVFP4, 1 (INT4) otherwise.
template <typename T, typename = void>
struct ScaleGroupsOf {
  static constexpr int value = 1;
};
template <typename T>
struct ScaleGroupsOf<T, std::void_t<decltype(T::kScaleGroups)>> {
  static constexpr int value = T::kScaleGroups;
};
template <typename T>
constexpr bool kE2M1Codes = ScaleGroupsOf<T>::value == 4;

// Kernel A's quantization steps per 64-column chunk of a layout: in step t every lane codes its runs
// j with quant_step(j) == t, which all lie in one scale group, shared with kGroupLanes lanes of its gid
// (4: all of them; 2: pairs tid 0/1 and 2/3). INT4 layouts: one step, the whole 64-group.
template <typename Layout>
__host__ __device__ constexpr int quant_steps() {
  if constexpr (kE2M1Codes<Layout>) return Layout::kQuantSteps;
  return 1;
}
template <typename Layout>
__host__ __device__ constexpr int quant_step(int j) {
  if constexpr (kE2M1Codes<Layout>) return Layout::quant_step(j);
  return 0;
}
template <typename Layout>
__host__ __device__ constexpr int group_lanes() {
  if constexpr (kE2M1Codes<Layout>) return Layout::kGroupLanes;
  return 4;
}

// Whether a GEMM flavour's MMA applies the group scales itself and accumulates in fp32 (the sm_120
// block-scaled flavour, w4a4_nvfp4_bs.cuh) rather than giving exact integer group sums.
template <typename T, typename = void>
struct BlockScaledOf {
  static constexpr bool value = false;
};
template <typename T>
struct BlockScaledOf<T, std::void_t<decltype(T::kBlockScaled)>> {
  static constexpr bool value = T::kBlockScaled;
};
template <typename T>
constexpr bool kBlockScaled = BlockScaledOf<T>::value;

// numerics.quantize_act_nvfp4's group scale: e4m3(min(absmax / 6, 448)), true fp32 division, then
// round to nearest even E4M3 (saturating; the clamp already keeps it finite), returned as fp32.
__device__ __forceinline__ float nvfp4_group_scale(float absmax) {
  const float s = fminf(__fdiv_rn(absmax, 6.f), 448.f);
  return static_cast<float>(__nv_fp8_e4m3(s));
}

// numerics.round_to_e2m1 of v / scale (true division): the nearest of 0, .5, 1, 1.5, 2, 3, 4, 6, ties
// to the even code, saturating; bit 3 = sign, never a negative zero. scale 0 -> code 0.
__device__ __forceinline__ uint32_t e2m1_code(float v, float scale) {
  if (!(scale > 0.f)) return 0u;
  const float q = __fdiv_rn(v, scale);
  const float a = fabsf(q);
  // Each midpoint moves the index up by one; at a tie the even neighbour wins ('>' when the lower
  // code is even, '>=' when the upper one is).
  const uint32_t idx = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.f);
  return idx | ((q < 0.f && idx > 0) ? 8u : 0u);
}

// Four E2M1 codes (the low 16 bits of sel, code b in bits 4b) -> four int8 values 2 * e2m1 (byte b).
// PRMT is an 8-entry byte table lookup per selector nibble: one table of the magnitudes, one of their
// negatives, then a third PRMT picks byte b from the negative (sign set) or positive result.
__device__ __forceinline__ uint32_t e2m1x4_to_s8x4(uint32_t sel) {
  const uint32_t idx = sel & 0x7777u;
  const uint32_t pos = __byte_perm(0x03020100u, 0x0C080604u, idx);  //  0  1  2  3  4  6  8  12
  const uint32_t neg = __byte_perm(0xFDFEFF00u, 0xF4F8FAFCu, idx);  //  0 -1 -2 -3 -4 -6 -8 -12
  // selector b = b (neg) if the sign bit (bit 4b+3) is set, else 4 + b (pos)
  return __byte_perm(neg, pos, 0x7654u - ((sel >> 1) & 0x4444u));
}

// d += A(16x16 s8) * B(16x8 s8), int32 accumulate.
__device__ __forceinline__ void mma_s8_m16n8k16(int32_t (&d)[4], const uint32_t (&a)[2], uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(b));
#else
  __trap();  // Never reached: the host selects NVFP4 only on sm_80 and newer.
#endif
}

// The GEMM flavour: one k16 MMA and one rescale per 16-group. The fragments keep the words as loaded
// and decode a 16-group's runs to int8 where its MMA needs them (decoding all four groups up front
// holds twice the registers and spills).
struct MmaE2M1S8m16n8k16 {
  using Layout = E2M1Layout;
  static constexpr int kScaleGroups = Layout::kScaleGroups;
  static constexpr int kMinBlocksPerSm = 0;  // __launch_bounds__: the register budget is ptxas's
  struct AFrag { uint2 row[2]; };  // rows gid, gid+8
  struct BFrag { uint2 col; };
  template <bool kActUnsigned>  // always false: E2M1 codes are signed
  static __device__ __forceinline__ AFrag a_frag(uint2 row0, uint2 row1) { return AFrag{{row0, row1}}; }
  static __device__ __forceinline__ BFrag b_frag(uint2 col) { return BFrag{col}; }
  // Run s (= 16-group s) of a lane's row: the 16 bits of word s/2, as 4 int8 values 2 * e2m1.
  static __device__ __forceinline__ uint32_t run_s8(uint2 w, int s) {
    return e2m1x4_to_s8x4((s < 2 ? w.x : w.y) >> (16 * (s % 2)));
  }
  // sum = the exact int32 dot products of 16-group s of the chunk (sum must be zero on entry).
  template <bool kActUnsigned>
  static __device__ __forceinline__ void scale_group_dot(int32_t (&sum)[4], const AFrag& a, const BFrag& b, int s) {
    const uint32_t a_s[2] = {run_s8(a.row[0], s), run_s8(a.row[1], s)};
    mma_s8_m16n8k16(sum, a_s, run_s8(b.col, s));
  }
};

// One scale group's exact dot product for any flavour: group s of the chunk for NVFP4, the whole
// 64-group (s = 0) for the INT4 flavours.
template <typename Mma, bool kActUnsigned>
__device__ __forceinline__ void scale_group_dot(int32_t (&sum)[4], const typename Mma::AFrag& a,
                                                const typename Mma::BFrag& b, int s) {
  if constexpr (kE2M1Codes<Mma>)
    Mma::template scale_group_dot<kActUnsigned>(sum, a, b, s);
  else
    Mma::template group_dot<kActUnsigned>(sum, a, b);
}

}  // namespace svdq
