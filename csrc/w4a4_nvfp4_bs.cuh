// NVFP4 W4A4 on Blackwell's block-scaled FP4 tensor cores (sm_120a: RTX 50xx): a GEMM flavour and a
// kernel-A layout for w4a4_int8.cu's kernels (templates over both).
//
//   mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3
//   (PTX ISA 8.7+, "Block Scaling for mma.sync"; needs the arch-specific target compute_120a/sm_120a,
//   which nunchaku_ext/cuda_build.py uses for 12.0. SASS: OMMA.SF.16864.F32.E2M1.E2M1.UE4M3.4X.)
//
// D = (A * scale_A) (B * scale_B) + C over one 16x8 tile and 64 k, with scale_A 16x4 and scale_B 4x8:
// one E4M3 scale per row (column) and 16-group, i.e. exactly NVFP4's group-16 scales. The codes go to
// the tensor core as stored (no decoding); it applies kernel A's activation scales and the file's
// weight scales itself and accumulates in fp32.
//
// Numerics differ from the spec (numerics.py / backends/reference.py), which takes every 16-group's
// dot product exactly, scales it by the two group scales and adds it to an fp32 sum (4 roundings per
// 64 k). Here the tensor core adds a whole 64-k MMA (4 scaled groups) into the fp32 accumulator, with
// an internal precision and rounding the PTX ISA does not specify. The products themselves are exact
// (E2M1 x E2M1 x E4M3 x E4M3 has at most 2+2+4+4 significant bits), so only the accumulation order and
// precision differ: not bit-identical, tested within a tolerance (docs/kernels.md, "NVFP4 on sm_120").
// The codes are E2M1 values, not twice them as on the INT8 path, so the sum is 1/4 of that path's:
// the kernel multiplies it by 4 (exact) before the spec's alpha = wtscale / 4 and wcscales[n].
//
// Layout (E2M1NativeLayout): lane tid's runs are k 8tid + 0..7 and 32 + 8tid + 0..7 of each 64-chunk -
// the MMA's own k, since the block scales belong to fixed 16-groups (tid/2 and 2 + tid/2). Its two words
// (two 4-byte accesses per row and chunk) are the registers of the PTX ISA's m16n8k64 fragments for
// .e2m1, which are those of .s4/.u4 ("Matrix Fragments for mma.m16n8k64"; NativeS4Fragments):
//   A  a0: row gid, k 8tid+e     a1: row gid+8, k 8tid+e     a2, a3: the same rows at k 32+8tid+e
//   B  b0: col gid, k 8tid+e     b1: col gid, k 32+8tid+e
//   D  d0, d1: row gid, cols 2tid, 2tid+1     d2, d3: row gid+8, same cols (the INT8 path's C)
// K (a multiple of 16) may end inside the last chunk, as on the INT8 NVFP4 path (w4a4_nvfp4.cuh).
//
// Scale registers, with the selectors {byte-id, thread-id} = {0, 0} (PTX ISA "Block Scaling for
// mma.sync"; scale_vec::4X uses all four bytes of the register, byte c = 16-group c of the 64 k; the
// lane mapping below is that of the ISA's scale-layout figures as public sm_120 code and a hardware
// probe of the 1X variant give it - not yet checked on an sm_120 GPU of ours):
//   scale_A of row gid     from lane 4gid     (tid 0)    scale_A of row gid+8 from lane 4gid+1 (tid 1)
//   scale_B of col gid     from lane 4gid     (tid 0)
// The other lanes' registers are not read. Activation scales are kernel A's fp32 [K64/16][M_pad]: the
// GEMM converts a row's 4 scales of a 64-chunk to one register of 4 E4M3 bytes (exact: they are E4M3
// values); weight scales are the file's E4M3 [K/16][N], whose 4 bytes of a column are the register.
#pragma once
#include <cuda_fp8.h>
#include <stdint.h>

#include "w4a4_s4.cuh"

namespace svdq {

// Kernel A's and the GEMM's runs for this flavour (see above): E2M1 codes, four 16-wide scale groups
// per 64 columns.
struct E2M1NativeLayout {
  static constexpr int kScaleGroups = 4;
  static constexpr int kAdjacentRuns = 2;
  static __host__ __device__ __forceinline__ constexpr int run_k(int j, int tid) {
    return 32 * (j / 2) + 8 * tid + 4 * (j % 2);
  }
  // Run j of lane tid covers k 32(j/2) + 8tid + 4(j%2) + 0..3, in 16-group 2(j/2) + tid/2: kernel A's
  // step t codes runs 2t, 2t+1, the lane's group 2t + tid/2 is shared by lanes tid 0,1 or 2,3.
  static constexpr int kQuantSteps = 2;
  static constexpr int kGroupLanes = 2;
  static __host__ __device__ constexpr int quant_step(int j) { return j / 2; }
  // The step at which 16-group s is quantized, and a lane (tid) that holds it then.
  static __host__ __device__ constexpr int step_of_group(int s) { return s / 2; }
  static __host__ __device__ constexpr int owner_tid(int s) { return 2 * (s % 2); }
};

struct MmaE2M1BlockScaledM16n8k64 : NativeS4Fragments<E2M1NativeLayout> {
  static constexpr int kScaleGroups = E2M1NativeLayout::kScaleGroups;
  static constexpr bool kBlockScaled = true;  // the MMA applies the group scales and accumulates in fp32

  // The scale register of one activation row: 4 fp32 scales of 16-groups 0..3, `stride` floats apart,
  // as 4 E4M3 bytes, byte c = group c.
  static __device__ __forceinline__ uint32_t act_scale_reg(const float* __restrict__ p, int64_t stride) {
    const __nv_fp8x2_storage_t lo =
        __nv_cvt_float2_to_fp8x2(make_float2(__ldg(p), __ldg(p + stride)), __NV_SATFINITE, __NV_E4M3);
    const __nv_fp8x2_storage_t hi =
        __nv_cvt_float2_to_fp8x2(make_float2(__ldg(p + 2 * stride), __ldg(p + 3 * stride)), __NV_SATFINITE, __NV_E4M3);
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  // The scale register of one weight column: its E4M3 scales of 16-groups 0..3, `stride` bytes apart;
  // groups at or past `groups_left` (past K) are zero.
  static __device__ __forceinline__ uint32_t wgt_scale_reg(const uint8_t* __restrict__ p, int64_t stride,
                                                           int groups_left) {
    uint32_t r = 0u;
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (c < groups_left) r |= static_cast<uint32_t>(__ldg(p + c * stride)) << (8 * c);
    return r;
  }

  // d += (A * scale_A)(B * scale_B) over one 64-k chunk; sfa, sfb as documented above.
  static __device__ __forceinline__ void mma(float (&d)[4], const AFrag& a, const BFrag& b, uint32_t sfa,
                                             uint32_t sfb) {
#if defined(__CUDA_ARCH_FEAT_SM120_ALL)
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3}, %10, {0, 0}, %11, {0, 0};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]), "r"(sfa), "r"(sfb));
#else
    __trap();  // Never reached: the host selects this flavour only on sm_120, built as sm_120a.
#endif
  }
};

}  // namespace svdq
