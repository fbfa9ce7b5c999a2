// W4A16 linear for the adaLN modulation layers (M = batch size, N up to 18432, K = 3072):
//
//   y[m,n] = sum_g ( (sum_{k in g} x[m,k] * code[n,k]) * scale[g,n] + (sum_{k in g} x[m,k]) * zero[g,n] ) + bias[n]
//
// which is x . (code * scale + zero)^T with the weight never dequantized: codes 0..15 are exact in
// bf16/fp16, so both inner sums run on the 16-bit tensor cores (mma.sync m16n8k16, fp32 accumulate;
// every product of a code and an input is exact), and the group's scale and zero are applied in
// fp32 once per 64-group. The sum of x over a group comes from the same MMA with an all-ones A.
//
// The weights are read IN PLACE from the layer's buffers, in the file layout (docs/format.md); there
// is no repacked copy:
//   qweight uint8 [N, K/2] row-major, unsigned codes, byte k/2 of row n = code[n,k] | code[n,k+1] << 4
//            (k even); group g of row n is the 32 contiguous bytes [32g, 32g + 32) of the row;
//   wscales, wzeros [K/64, N], 16-bit (bf16 or fp16, both the same); bias [N] of that dtype, or none.
// x may be bf16 or fp16 independently of the scales: the kernel is templated on both dtypes.
//
// The problem is memory-bound (M <= 8: 2 FLOP per 4-bit weight). Weights are the MMA's A operand
// (16 output features x 16 k), x is B (16 k x 8 batch rows).
//
// ------------------------------------------------------------------------------------------------
// Fragment layout (PTX "Matrix Fragments for mma.m16n8k16" with .bf16/.f16; lane = 4*gid + tid):
//   A (16x16, row)  reg0: row gid, k 2tid+{0,1}   reg1: row gid+8, k 2tid+{0,1}
//                   reg2: row gid, k 8+2tid+{0,1} reg3: row gid+8, k 8+2tid+{0,1}
//   B (16x8, col)   reg0: k 2tid+{0,1}, col gid   reg1: k 8+2tid+{0,1}, col gid
//   C (16x8, f32)   c0,c1: row gid, cols 2tid+{0,1}   c2,c3: row gid+8, same cols
// (the element of the lower k in the low 16 bits of a register).
//
// Weights. A block owns 32 output features n0 .. n0+31 as two 16-row tiles t; A row gid + 8r
// (r = 0, 1) of tile t is feature n = n0 + 16t + gid + 8r. In group g, lane (gid, tid) reads the
// 8 bytes [32g + 8tid, 32g + 8tid + 8) of each of its rows: the 16 codes of local columns
// c = 0..15, k = 64g + 16tid + c. The 4 lanes of a quad read one row's whole group, a 32-byte sector
// (K/2 is a multiple of 32, and torch allocations are 256-byte aligned; the binding asks for 8), so
// one 8-byte load instruction of a warp reads 8 full sectors. Word w (w = 0, 1) of those 8 bytes
// holds column c = 8w + i at bits 4i (i = 0..7).
//
// A dot product does not care how k is ordered as long as A and B agree. In k16 step j (0..3) of a
// group, with w = j >> 1 and p = 2*(j & 1), the MMA's logical k maps to the local columns
//   logical k 2tid+q   <-> c = 8w + p + 4q       (q = 0, 1)
//   logical k 8+2tid+q <-> c = 8w + p + 1 + 4q
// so that, with v = word_w >> 4p, both columns of an A register are one mask away:
//   reg (row r, k 2tid+q)   = (v & 0x000F000F) | magic, minus magic          (nibbles p, p+4)
//   reg (row r, k 8+2tid+q) = ((v >> 4) & 0x000F000F) | magic, minus magic   (nibbles p+1, p+5)
// magic = 128 in bf16, 1024 in fp16 (where the spacing of the 16-bit float is exactly 1): the codes
// land in the low mantissa bits, and the subtraction is exact. In fp16 the second register skips the
// shift: (v & 0x00F000F0) | magic is 1024 + 16*code, and one HFMA2 (x/16 - 64) gives the code,
// exactly. (bf16 cannot do that: its 7-bit mantissa ends below bit 7.)
// x (B): lane (gid, tid) loads x[m_base + gid][64g + 16tid .. +15] with two 16-byte loads into
// words xw[0..7] (xw[i] = columns 2i, 2i+1), and builds step j's B registers with two byte permutes
// (a batch row past M loads row M-1 instead: a B column only reaches its own C column, never stored):
//   b0 = prmt(xw[i], xw[i+2], 0x5410) = (x[c], x[c+4]),  b1 = prmt(xw[i], xw[i+2], 0x7632) = (x[c+1], x[c+5])
// for i = 4w + (j & 1), c = 2i = 8w + p: the same columns as A above.
// Scales and zeros: lane L loads wscales[g][n0 + L] and wzeros[g][n0 + L] (a warp reads 64
// contiguous bytes of each); the lanes of row gid + 8r of tile t take them from lane 16t + gid + 8r
// with a shuffle (the pair packed in one 32-bit word, scale in the low half).
//
// N tail: a block may run past N (N need not be a multiple of anything); every load of a feature
// >= N is clamped to feature N-1 (valid memory, result discarded) and the output store is guarded.
// K is a multiple of 64.
//
// Work split: a block owns 32 output features and 8 batch rows; its 8 warps take every 8th group and
// add their partial sums in shared memory in a fixed order (bitwise repeatable). Each warp keeps the
// weights (and scales, zeros) of kDepth groups in flight: a register ring, the load of group
// g + 8*kDepth is issued as soon as group g is multiplied; at K = 3072 (6 groups per warp) a block
// waits for memory about twice. Weights, scales and zeros are read once and streamed past L1
// (ld.global.nc.L1::no_allocate), so that x, which every block re-reads, stays cached there; x is
// loaded when its group is multiplied (an L1 hit but for the first block of an SM; prefetching it
// too would cost 8 registers per group in flight). Addresses are a warp-uniform origin per buffer
// plus per-lane 32-bit offsets (below 32 rows of qweight: K <= 2^26 keeps them in range).
// Larger M: the grid's x dimension walks the batch in chunks of 8 rows and is the fastest-varying,
// so the chunks of one 32-feature slab run back to back and their repeated weight reads hit L2 -
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
constexpr int kDepth = 3;                  // groups of weights in flight per warp
// Register budget: 3 blocks (24 warps) per SM, 80 registers, no spills. sm_120's code generation
// wants more (it spills at 80): 2 blocks there (the CUDA guide's per-arch __launch_bounds__ pattern).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200
constexpr int kMinBlocksPerSM = 2;
#else
constexpr int kMinBlocksPerSM = 3;
#endif
static_assert(kTiles * 4 * 32 == kThreads, "the final reduction gives one accumulator element per thread");
static_assert(kW4A16BlockN == 32, "lane L loads the scale and zero of feature n0 + L");

// (v & mask) | c in one LOP3. c is a register operand: left to itself the compiler splits the
// expression into two LOP3s with immediate operands (register pressure), one op per A register more.
template <uint32_t kMask>
__device__ __forceinline__ uint32_t and_or(uint32_t v, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "n"(kMask), "r"(c));  // 0xEA = (a & b) | c
  return r;
}

template <typename T> struct Half;
template <> struct Half<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 pair (128, 128)
  static constexpr uint32_t kOnes = 0x3F803F80u;   // bf16 pair (1, 1)
  static __device__ __forceinline__ uint32_t minus_magic(uint32_t v) {
    uint32_t magic = kMagic;
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), *reinterpret_cast<__nv_bfloat162*>(&magic));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  // Codes of nibbles p, p+4 of v (bits 0..3 and 16..19) -> bf16 pair; magic = kMagic in a register.
  static __device__ __forceinline__ uint32_t codes_lo(uint32_t v, uint32_t magic) {
    return minus_magic(and_or<0x000F000Fu>(v, magic));
  }
  // Codes of nibbles p+1, p+5 of v (bits 4..7 and 20..23) -> bf16 pair.
  static __device__ __forceinline__ uint32_t codes_hi(uint32_t v, uint32_t magic) {
    return minus_magic(and_or<0x000F000Fu>(v >> 4, magic));
  }
  static __device__ __forceinline__ float to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }
  // The high half of a 32-bit word as a float (the low half ignored).
  static __device__ __forceinline__ float high_to_float(uint32_t word) { return __uint_as_float(word & 0xFFFF0000u); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Half<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 pair (1024, 1024)
  static constexpr uint32_t kOnes = 0x3C003C00u;   // fp16 pair (1, 1)
  static __device__ __forceinline__ uint32_t codes_lo(uint32_t v, uint32_t magic) {
    uint32_t t = and_or<0x000F000Fu>(v, magic), m = kMagic;
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&t), *reinterpret_cast<__half2*>(&m));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t codes_hi(uint32_t v, uint32_t magic) {
    // No shift: (v & 0x00F000F0) | magic = 1024 + 16*code, and (1024 + 16*code) / 16 - 64 = code,
    // exact (one rounding of an exact result).
    uint32_t t = and_or<0x00F000F0u>(v, magic), sixteenth = 0x2C002C00u /* 1/16 */, minus64 = 0xD400D400u;
    __half2 r = __hfma2(*reinterpret_cast<__half2*>(&t), *reinterpret_cast<__half2*>(&sixteenth),
                        *reinterpret_cast<__half2*>(&minus64));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ float to_float(uint32_t bits16) {
    __half_raw raw;
    raw.x = static_cast<unsigned short>(bits16);
    return __half2float(__half(raw));
  }
  static __device__ __forceinline__ float high_to_float(uint32_t word) { return to_float(word >> 16); }
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

// Weights, scales and zeros are read once: keep them out of L1, where x lives. volatile: issued in
// program order with respect to the MMAs, so that the prefetch ring really runs ahead.
__device__ __forceinline__ uint2 load_streaming_u2(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t load_streaming_u16(const uint8_t* p) {
  unsigned short v;
  asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

// One group's weight operands of a lane, as loaded (used only when the group is multiplied).
struct GroupWeights {
  uint2 w[kTiles][2];  // [tile t][row half r]: 8 bytes of feature n0 + 16t + gid + 8r, columns 16tid .. +15
  uint32_t scale;      // 16-bit bits of wscales[g][n0 + lane]
  uint32_t zero;       // 16-bit bits of wzeros[g][n0 + lane]
};

// Byte offsets of a lane's operands from the block's (n0, group g) origin of each buffer; features
// past N clamped to N-1. Below 32 rows of qweight (< 2^31 bytes for K < 2^26) and 64 bytes of scales.
struct LaneOffsets {
  uint32_t w[kTiles][2];  // ((n - n0) * K/2 + 8 tid) for n = min(n0 + 16t + gid + 8r, N-1)
  uint32_t sz;            // (min(n0 + lane, N-1) - n0) * 2
};

// Group g's weights: w_g = qweight + n0 * K/2 + 32 g, s_g / z_g = wscales / wzeros + (g * N + n0) * 2 bytes.
__device__ __forceinline__ void load_weights(GroupWeights& gw, const LaneOffsets& o, const uint8_t* w_g,
                                             const uint8_t* s_g, const uint8_t* z_g) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int r = 0; r < 2; ++r) gw.w[t][r] = load_streaming_u2(w_g + o.w[t][r]);
  gw.scale = load_streaming_u16(s_g + o.sz);
  gw.zero = load_streaming_u16(z_g + o.sz);
}

// x[m][64g + 16tid .. +15]: two 16-byte loads, L1-cached (every block reads x).
template <typename InT>
__device__ __forceinline__ void load_x(uint4 (&xv)[2], const InT* x_g) {
  xv[0] = __ldg(reinterpret_cast<const uint4*>(x_g));
  xv[1] = __ldg(reinterpret_cast<const uint4*>(x_g) + 1);
}

// acc[t][e] += this group's contribution: scale * sum(x * code) + zero * sum(x), per C element e.
template <typename InT, typename ScaleT>
__device__ __forceinline__ void multiply_group(float (&acc)[kTiles][4], const GroupWeights& gw, const uint4 (&xv)[2],
                                               int gid, uint32_t magic) {
  const uint32_t xw[8] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w};
  uint32_t b[4][2];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = 4 * (j >> 1) + (j & 1);
    b[j][0] = __byte_perm(xw[i], xw[i + 2], 0x5410);  // (x[c], x[c+4]),   c = 8w + p
    b[j][1] = __byte_perm(xw[i], xw[i + 2], 0x7632);  // (x[c+1], x[c+5])
  }
  const uint32_t ones[4] = {Half<InT>::kOnes, Half<InT>::kOnes, Half<InT>::kOnes, Half<InT>::kOnes};
  float xsum[4] = {0.f, 0.f, 0.f, 0.f};  // c0/c2 = sum of x[m = 2tid] over the group, c1/c3 of m = 2tid+1
#pragma unroll
  for (int j = 0; j < 4; ++j) mma_m16n8k16<InT>(xsum, ones, b[j][0], b[j][1]);

  // (scale, zero) of the lane's 4 features, from the lanes that loaded them (scale in the low half).
  const uint32_t sz_own = gw.scale | (gw.zero << 16);
  uint32_t sz[kTiles][2];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int r = 0; r < 2; ++r) sz[t][r] = __shfl_sync(0xFFFFFFFFu, sz_own, 16 * t + gid + 8 * r);

#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    float dot[4] = {0.f, 0.f, 0.f, 0.f};  // this group's sum of x * code
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t v = (j < 2 ? gw.w[t][r].x : gw.w[t][r].y) >> (8 * (j & 1));  // v = word_w >> 4p
        a[r] = Half<InT>::codes_lo(v, magic);      // row gid + 8r, logical k 2tid+{0,1}
        a[2 + r] = Half<InT>::codes_hi(v, magic);  // row gid + 8r, logical k 8+2tid+{0,1}
      }
      mma_m16n8k16<InT>(dot, a, b[j][0], b[j][1]);
    }
    // Row gid (e = 0, 1) and row gid+8 (e = 2, 3): acc += scale * dot + zero * xsum.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float scale = Half<ScaleT>::to_float(sz[t][r]), zero = Half<ScaleT>::high_to_float(sz[t][r]);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int e = 2 * r + q;
        acc[t][e] = fmaf(scale, dot[e], fmaf(zero, xsum[e], acc[t][e]));
      }
    }
  }
}

template <typename InT, typename ScaleT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
w4a16_gemv_kernel(const uint8_t* __restrict__ qweight, const uint8_t* __restrict__ wscales,
                  const uint8_t* __restrict__ wzeros, const uint16_t* __restrict__ bias,
                  const InT* __restrict__ x, int64_t ldx, InT* __restrict__ out, int M, int N, int G) {
  __shared__ float partial[kWarps][kTiles * 4][32];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tid = lane % 4;
  const int m_base = blockIdx.x * kW4A16BlockM;
  const int n0 = blockIdx.y * kW4A16BlockN;
  // This lane loads the B column of batch row m_base + gid. A row past M loads row M-1 instead: a B
  // column only reaches its own C column, which is never stored.
  const int m_lane = min(m_base + gid, M - 1);
  const uint32_t row_bytes = static_cast<uint32_t>(G) * 32;

  LaneOffsets o;
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      o.w[t][r] = static_cast<uint32_t>(min(n0 + 16 * t + gid + 8 * r, N - 1) - n0) * row_bytes + 8 * tid;
  o.sz = static_cast<uint32_t>(min(n0 + lane, N - 1) - n0) * 2;

  // Warp `warp` multiplies groups warp, warp + 8, ...; the origins below are those of its first group.
  const int64_t s_stride = static_cast<int64_t>(kWarps) * N * 2;  // scale bytes from group g to g + 8
  const uint8_t* w_g = qweight + static_cast<int64_t>(n0) * row_bytes + warp * 32;
  const uint8_t* s_g = wscales + (static_cast<int64_t>(warp) * N + n0) * 2;
  const uint8_t* z_g = wzeros + (static_cast<int64_t>(warp) * N + n0) * 2;
  const InT* x_g = x + static_cast<int64_t>(m_lane) * ldx + warp * kW4A16Group + tid * 16;

  uint32_t magic;  // kept in a register for and_or
  asm("mov.b32 %0, %1;" : "=r"(magic) : "n"(Half<InT>::kMagic));

  float acc[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;

  // ring[d] holds group g0 + 8d of the current round g0.
  GroupWeights ring[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d)
    if (warp + kWarps * d < G) load_weights(ring[d], o, w_g + d * kWarps * 32, s_g + d * s_stride, z_g + d * s_stride);
  for (int g0 = warp; g0 < G; g0 += kWarps * kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (g0 + kWarps * d < G) {
        uint4 xv[2];
        load_x(xv, x_g + d * kWarps * kW4A16Group);
        multiply_group<InT, ScaleT>(acc, ring[d], xv, gid, magic);
        if (g0 + kWarps * (d + kDepth) < G)  // refill the slot with the group kDepth rounds ahead
          load_weights(ring[d], o, w_g + (d + kDepth) * kWarps * 32, s_g + (d + kDepth) * s_stride,
                       z_g + (d + kDepth) * s_stride);
      }
    }
    w_g += kDepth * kWarps * 32;
    s_g += kDepth * s_stride;
    z_g += kDepth * s_stride;
    x_g += kDepth * kWarps * kW4A16Group;
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
  const int n = n0 + 16 * t + src_lane / 4 + 8 * (e >> 1);
  const int m = m_base + 2 * (src_lane % 4) + (e & 1);
  if (n < N && m < M) {
    const float b = bias != nullptr ? Half<ScaleT>::to_float(bias[n]) : 0.f;
    out[static_cast<int64_t>(m) * N + n] = Half<InT>::from_float(sum + b);
  }
}

template <typename InT, typename ScaleT>
cudaError_t launch_typed(const W4A16Args& a, cudaStream_t stream) {
  const dim3 grid((a.M + kW4A16BlockM - 1) / kW4A16BlockM, (a.N + kW4A16BlockN - 1) / kW4A16BlockN);
  w4a16_gemv_kernel<InT, ScaleT><<<grid, kThreads, 0, stream>>>(
      a.qweight, static_cast<const uint8_t*>(a.wscales), static_cast<const uint8_t*>(a.wzeros),
      static_cast<const uint16_t*>(a.bias), static_cast<const InT*>(a.x), a.ldx, static_cast<InT*>(a.out), a.M,
      a.N, a.G);
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
