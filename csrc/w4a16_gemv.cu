// W4A16 linear for the adaLN modulation layers (M = batch size, N up to 18432, K = 3072):
//
//   y[m,n] = sum_g ( (sum_{k in g} x[m,k] * code[n,k]) * scale[g,n] + (sum_{k in g} x[m,k]) * zero[g,n] ) + bias[n]
//
// which is x . (code * scale + zero)^T with the weight never dequantized: codes 0..15 are exact in
// bf16/fp16, so both inner sums run on the 16-bit tensor cores (mma.sync m16n8k16, fp32 accumulate;
// every product of a code and an input is exact), and the group's scale and zero are applied in
// fp32 once per 64-group. The sum of x over a group comes from the same MMA with an all-ones A.
//
// The problem is memory-bound (M <= 8: 2 FLOP per 4-bit weight), so the layout exists to read every
// weight byte once with 16-byte loads: weights are the MMA's A operand (16 output features x 16 k),
// x is B (16 k x 8 batch rows), and one 16-byte word per lane holds a whole 16 x 64 group.
//
// ------------------------------------------------------------------------------------------------
// Fragment layout (PTX "Matrix Fragments for mma.m16n8k16" with .bf16/.f16; lane = 4*gid + tid):
//   A (16x16, row)  reg0: row gid, k 2tid+{0,1}   reg1: row gid+8, k 2tid+{0,1}
//                   reg2: row gid, k 8+2tid+{0,1} reg3: row gid+8, k 8+2tid+{0,1}
//   B (16x8, col)   reg0: k 2tid+{0,1}, col gid   reg1: k 8+2tid+{0,1}, col gid
//   C (16x8, f32)   c0,c1: row gid, cols 2tid+{0,1}   c2,c3: row gid+8, same cols
// A dot product does not care how k is ordered as long as A and B agree, so the MMA's k index is
// mapped to the group's columns such that a lane's B data is CONTIGUOUS in x: in k16 step j (0..3),
//   logical k 2tid+q   <-> column 16*tid + 4j + q        (q = 0, 1)
//   logical k 8+2tid+q <-> column 16*tid + 4j + 2 + q
// so lane (gid, tid) needs x[m = gid][64g + 16tid .. 16tid+15]: two 16-byte loads, and the 8 words
// loaded are, in order, B reg0/reg1 of steps 0..3. No shuffles.
//
// Weights, 16-row tile T and group g: one uint4 per lane, wgt_packed[(T * G + g) * 32 + lane].
// Word j (= k16 step j), nibble at bit 4r + 16q (r = 0..3 = A register, q = element of the pair):
//   code[16T + gid + 8*(r & 1)][64g + 16tid + 4j + 2*(r >> 1) + q]
// so A register r of step j = ((word >> 4r) & 0x000F000F) | magic, minus magic: the two codes land
// in the low mantissa bits of two 16-bit floats of value magic + code (128 in bf16, 1024 in fp16,
// where the spacing is exactly 1), one LOP3 and one subtraction per register, exact.
// Scale and zero: scale_zero[(T * G + g) * 8 + gid] = uint2 {(scale, zero) of row gid, of row gid+8},
// each a 32-bit pair of the layer's 16-bit dtype (scale in the low half).
// nunchaku_ext/backends/cuda_w4a16.py packs both from the file layout, once per layer and device.
//
// Work split: a block owns 32 output features (two tiles) and 8 batch rows; its 8 warps take every
// 8th group (so the block reads contiguous 4 KB runs of each tile), and add their partial sums in
// shared memory in a fixed order (bitwise repeatable). Weights are streamed past L1
// (ld.global.nc.L1::no_allocate) so that x, which every block re-reads, stays cached.
// Larger M: grid.y walks the batch in chunks of 8 rows (weights then come from L2 once per chunk) -
// correct for any M, efficient for the modulation's small M.
// ------------------------------------------------------------------------------------------------

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "w4a16_gemv.h"

namespace svdq {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTiles = kW4A16BlockN / 16;  // 16-row weight tiles per block (each warp does all of them)
static_assert(kTiles * 4 * 32 == kThreads, "the final reduction gives one accumulator element per thread");

template <typename T> struct Half;
template <> struct Half<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 pair (128, 128)
  static constexpr uint32_t kOnes = 0x3F803F80u;   // bf16 pair (1, 1)
  static __device__ __forceinline__ uint32_t minus_magic(uint32_t v) {
    uint32_t magic = kMagic;
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), *reinterpret_cast<__nv_bfloat162*>(&magic));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __uint_as_float(static_cast<uint32_t>(bits) << 16); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Half<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 pair (1024, 1024)
  static constexpr uint32_t kOnes = 0x3C003C00u;   // fp16 pair (1, 1)
  static __device__ __forceinline__ uint32_t minus_magic(uint32_t v) {
    uint32_t magic = kMagic;
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&v), *reinterpret_cast<__half2*>(&magic));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

// d += A(16x16) * B(16x8), 16-bit inputs, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host refuses GPUs below sm_80
#endif
}

// Weights are read once: keep them out of L1, where x lives.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

struct GroupOperands {
  uint4 w[kTiles];      // packed codes, one 16 x 64 group per tile
  uint2 sz[kTiles];     // (scale, zero) pairs of rows gid, gid+8
  uint4 x[2];           // x[m][64g + 16tid .. +15]: B registers of the 4 k16 steps
};

template <typename InT>
__device__ __forceinline__ void load_group(GroupOperands& op, const uint4* wgt, const uint2* scale_zero,
                                           const InT* x_lane, bool m_valid, int tile0, int G, int g, int lane,
                                           int gid) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const int64_t tg = static_cast<int64_t>(tile0 + t) * G + g;
    op.w[t] = load_streaming(wgt + tg * 32 + lane);
    op.sz[t] = __ldg(scale_zero + tg * 8 + gid);
  }
  if (m_valid) {
    const uint4* xp = reinterpret_cast<const uint4*>(x_lane + static_cast<int64_t>(g) * kW4A16Group);
    op.x[0] = __ldg(xp);
    op.x[1] = __ldg(xp + 1);
  } else {
    op.x[0] = op.x[1] = make_uint4(0u, 0u, 0u, 0u);  // batch rows past M: B column of zeros
  }
}

template <typename InT, typename ScaleT>
__global__ void __launch_bounds__(kThreads)
w4a16_gemv_kernel(const uint4* __restrict__ wgt, const uint2* __restrict__ scale_zero, const float* __restrict__ bias,
                  const InT* __restrict__ x, int64_t ldx, InT* __restrict__ out, int M, int N, int G) {
  __shared__ float partial[kWarps][kTiles * 4][32];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tid = lane % 4;
  const int tile0 = blockIdx.x * kTiles;
  const int m_base = blockIdx.y * kW4A16BlockM;
  const bool m_valid = m_base + gid < M;  // this lane loads the B column of batch row m_base + gid
  const InT* x_lane = x + static_cast<int64_t>(m_valid ? m_base + gid : 0) * ldx + tid * 16;

  const uint32_t ones[4] = {Half<InT>::kOnes, Half<InT>::kOnes, Half<InT>::kOnes, Half<InT>::kOnes};
  float acc[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;

  GroupOperands cur, next;
  if (warp < G) load_group(cur, wgt, scale_zero, x_lane, m_valid, tile0, G, warp, lane, gid);
  for (int g = warp; g < G; g += kWarps) {
    // Prefetch this warp's next group while the current one is multiplied.
    if (g + kWarps < G) load_group(next, wgt, scale_zero, x_lane, m_valid, tile0, G, g + kWarps, lane, gid);

    const uint32_t xw[8] = {cur.x[0].x, cur.x[0].y, cur.x[0].z, cur.x[0].w,
                            cur.x[1].x, cur.x[1].y, cur.x[1].z, cur.x[1].w};
    float xsum[4] = {0.f, 0.f, 0.f, 0.f};  // c0/c2 = sum of x[m = 2tid] over the group, c1/c3 of m = 2tid+1
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_m16n8k16<InT>(xsum, ones, xw[2 * j], xw[2 * j + 1]);

#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const uint32_t words[4] = {cur.w[t].x, cur.w[t].y, cur.w[t].z, cur.w[t].w};
      float dot[4] = {0.f, 0.f, 0.f, 0.f};  // this group's sum of x * code
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = Half<InT>::minus_magic(((words[j] >> (4 * r)) & 0x000F000Fu) | Half<InT>::kMagic);
        mma_m16n8k16<InT>(dot, a, xw[2 * j], xw[2 * j + 1]);
      }
      // Row gid (e = 0, 1) and row gid+8 (e = 2, 3): acc += scale * dot + zero * xsum.
      const uint32_t pair[2] = {cur.sz[t].x, cur.sz[t].y};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float scale = Half<ScaleT>::to_float(static_cast<uint16_t>(pair[e >> 1] & 0xFFFFu));
        const float zero = Half<ScaleT>::to_float(static_cast<uint16_t>(pair[e >> 1] >> 16));
        acc[t][e] = fmaf(scale, dot[e], fmaf(zero, xsum[e], acc[t][e]));
      }
    }
    cur = next;
  }

  // Sum the warps' partials in a fixed order, add the bias, round once.
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp][t * 4 + e][lane] = acc[t][e];
  __syncthreads();
  const int te = threadIdx.x / 32, src_lane = threadIdx.x % 32;  // one accumulator element per thread
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += partial[w][te][src_lane];
  const int t = te / 4, e = te % 4;
  const int n = (tile0 + t) * 16 + src_lane / 4 + 8 * (e >> 1);
  const int m = m_base + 2 * (src_lane % 4) + (e & 1);
  if (n < N && m < M) out[static_cast<int64_t>(m) * N + n] = Half<InT>::from_float(sum + bias[n]);
}

template <typename InT, typename ScaleT>
cudaError_t launch_typed(const W4A16Args& a, cudaStream_t stream) {
  const dim3 grid(a.N_pad / kW4A16BlockN, (a.M + kW4A16BlockM - 1) / kW4A16BlockM);
  w4a16_gemv_kernel<InT, ScaleT><<<grid, kThreads, 0, stream>>>(
      static_cast<const uint4*>(a.wgt_packed), static_cast<const uint2*>(a.scale_zero), a.bias,
      static_cast<const InT*>(a.x), a.ldx, static_cast<InT*>(a.out), a.M, a.N, a.G);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_w4a16_gemv(const W4A16Args& a, bool input_is_bf16, bool scales_are_bf16, cudaStream_t stream) {
  if (input_is_bf16)
    return scales_are_bf16 ? launch_typed<__nv_bfloat16, __nv_bfloat16>(a, stream)
                           : launch_typed<__nv_bfloat16, __half>(a, stream);
  return scales_are_bf16 ? launch_typed<__half, __nv_bfloat16>(a, stream) : launch_typed<__half, __half>(a, stream);
}

}  // namespace svdq
