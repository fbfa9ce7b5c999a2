// Native 4-bit tensor-core flavours of the W4A4 GEMM (w4a4_int8.cu holds the kernels, which are
// templates over the flavour): the codes go to the MMA as they are stored, no nibble expansion.
//
//   MmaS4m16n8k64  mma.sync.aligned.m16n8k64.row.col.s32.{s4,u4}.s4.s32   sm_80, sm_86, sm_89
//                  (SASS IMMA.16864.S4.S4 / .U4.S4: twice the INT8 rate on those GPUs)
//   MmaS4m8n8k32   mma.sync.aligned.m8n8k32.row.col.s32.{s4,u4}.s4.s32    sm_75 (Turing has no
//                  m16n8k32 s8 and no m16n8k64 s4; SASS IMMA.8832.S4.S4 / .U4.S4)
//
// Both are legal on sm_90 and sm_120, where ptxas emulates them (a call to an unpack routine, then
// IMMA.S8, ~45 TOPS on an H200): too slow to use there, but it runs the same instruction semantics,
// which is how the tests verify these paths on a Hopper GPU by forcing them (SVDQ_MMA_PATH).
//
// Numerics are the INT8 path's: one MMA chain per 64-group into a zeroed int32 accumulator (exact:
// |sum| <= 64*8*15), then the kernel rescales it in fp32.
//
// ------------------------------------------------------------------------------------------------
// Fragments. Both flavours use Lane16Layout (w4a4_int8.cu): lane tid owns k 16tid .. 16tid+15 of each
// 64-chunk of its rows, as two words (w0: k 16tid+0..7, w1: k 16tid+8..15, code e in bits 4e) that
// ARE s4 MMA registers as loaded from memory.
//
// mma.sync.m16n8k64 .s4/.u4 register fragments (PTX ISA, "Matrix Fragments for mma.m16n8k64"),
// lane = 4*gid + tid; each register holds 8 codes, element e in bits 4e..4e+3:
//   A (16x64)  a0: row gid, k tid*8+e     a1: row gid+8, k tid*8+e
//              a2: row gid, k 32+tid*8+e  a3: row gid+8, k 32+tid*8+e
//   B (64x8)   b0: col gid, k tid*8+e     b1: col gid, k 32+tid*8+e
//   C (16x8)   as for m16n8k32: c0,c1 row gid, cols 2*tid, 2*tid+1; c2,c3 row gid+8
// So a0 / a1 = w0 of rows gid / gid+8, a2 / a3 = their w1, b0 / b1 = the weight row's w0 / w1: MMA
// slot k 8tid+e holds k 16tid+e and slot 32+8tid+e holds k 16tid+8+e, in both operands.
//
// m8n8k32 .s4 (PTX "Matrix Fragments for mma.m8n8k32"): A (8x32) one register, row gid, k tid*8+e;
// B (32x8) one register, col gid, k tid*8+e; C c0,c1 row gid, cols 2*tid, 2*tid+1. So the m16n8k64
// registers above are four m8n8k32 operands: rows gid   = (a0 x b0) + (a2 x b1) -> c0, c1
//                                              rows gid+8 = (a1 x b0) + (a3 x b1) -> c2, c3
// and one set of fragments serves both s4 flavours.
// ------------------------------------------------------------------------------------------------
#pragma once
#include <stdint.h>

namespace svdq {

// The words are the MMA registers. Layout: Lane16Layout for INT4 (here), E2M1NativeLayout for the
// sm_120 NVFP4 flavour (w4a4_nvfp4_bs.cuh), whose words are the same registers over other k.
template <typename L>
struct NativeS4Fragments {
  using Layout = L;
  static constexpr int kMinBlocksPerSm = 0;  // __launch_bounds__: 0 leaves the register budget to ptxas
  struct AFrag { uint32_t r[4]; };  // a0..a3
  struct BFrag { uint32_t r[2]; };  // b0, b1
  template <bool kActUnsigned>
  static __device__ __forceinline__ AFrag a_frag(uint2 row0, uint2 row1) { return AFrag{{row0.x, row1.x, row0.y, row1.y}}; }
  static __device__ __forceinline__ BFrag b_frag(uint2 col) { return BFrag{{col.x, col.y}}; }
};

struct MmaS4m16n8k64 : NativeS4Fragments<Lane16Layout> {
  // sum = the group's exact int32 dot products (sum must be zero on entry).
  template <bool kActUnsigned>
  static __device__ __forceinline__ void group_dot(int32_t (&sum)[4], const AFrag& a, const BFrag& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kActUnsigned) {
      asm volatile(
          "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 "
          "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+r"(sum[0]), "+r"(sum[1]), "+r"(sum[2]), "+r"(sum[3])
          : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 "
          "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+r"(sum[0]), "+r"(sum[1]), "+r"(sum[2]), "+r"(sum[3])
          : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
    }
#else
    __trap();  // Never reached: the host selects this flavour only on sm_80 and newer.
#endif
  }
};

struct MmaS4m8n8k32 : NativeS4Fragments<Lane16Layout> {
  // Left to itself, ptxas caps this flavour at 128 registers on sm_75 (two blocks per SM) and spills
  // 16 bytes that are reloaded in the main loop; one block per SM, as on every other arch, needs
  // ~225 registers and spills nothing. Which is faster on a Turing GPU is not measured (none here).
  static constexpr int kMinBlocksPerSm = 1;
  template <bool kActUnsigned>
  static __device__ __forceinline__ void m8n8k32(int32_t& c0, int32_t& c1, uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
    if constexpr (kActUnsigned) {
      asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.u4.s4.s32 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
                   : "+r"(c0), "+r"(c1) : "r"(a), "r"(b));
    } else {
      asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.s4.s4.s32 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
                   : "+r"(c0), "+r"(c1) : "r"(a), "r"(b));
    }
#else
    __trap();  // Never reached: the kernels are not built below sm_75.
#endif
  }

  // The m16n8k64 product as four m8n8k32 (see the layout comment above).
  template <bool kActUnsigned>
  static __device__ __forceinline__ void group_dot(int32_t (&sum)[4], const AFrag& a, const BFrag& b) {
    m8n8k32<kActUnsigned>(sum[0], sum[1], a.r[0], b.r[0]);
    m8n8k32<kActUnsigned>(sum[2], sum[3], a.r[1], b.r[0]);
    m8n8k32<kActUnsigned>(sum[0], sum[1], a.r[2], b.r[1]);
    m8n8k32<kActUnsigned>(sum[2], sum[3], a.r[3], b.r[1]);
  }
};

}  // namespace svdq
