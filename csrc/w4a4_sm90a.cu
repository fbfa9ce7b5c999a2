// SVDQuant W4A4 linear on sm_90a (H100 / H200): the INT4 GEMM on warpgroup MMAs (wgmma), FP8 E4M3.
//
//   y[m,n] = sum_g (sum_{k in g} qx[m,k] * qw[n,k]) * sx[m,g] * sw[g,n]    exact per group, fp32 sum
//          + sum_r lora_act[m,r] * lora_up[n,r]                            low-rank branch, tf32 hi/lo wgmma
//          + bias[n]                                                       one rounding to T
//
// The group sums are the mma.sync path's (w4a4_int8.cu, kernel B) bit for bit, and scaled and summed in
// fp32 in the same order with the same roundings; the low-rank branch runs on the tensor cores here
// (below), so outputs agree with that path bit for bit at rank 0 and to the spec's tolerance otherwise.
// Kernel A of this path is w4a4_int8.cu's quantize_act_lora_down_kernel with Lane16E4M3Layout: the same
// codes and scales, stored for this GEMM.
//
// Why wgmma, and why E4M3. On sm_90 mma.sync reaches ~1290 TOPS s8 in a register-only loop but the
// mma.sync GEMM of w4a4_int8.cu reaches ~0.2-0.27x bf16 cuBLAS on the FLUX shapes; the warpgroup MMA
// with TMA-fed shared memory is the Hopper way to keep the tensor cores busy. wgmma has no int4 type;
// it has s8 (int32 accumulate) and e4m3 (fp32 accumulate) at the same rate. A 4-bit code q (signed
// [-8, 7], or unsigned [0, 15] for the shifted-GELU inputs) is exactly representable as an E4M3
// *subnormal / first-binade* value q * 2^-9: byte 0x00..0x0F = 0..15 * 2^-9, sign in bit 7. Products
// are q * q' * 2^-18 and a 64-group's sum is an integer times 2^-18 with |sum| <= 64 * 15 * 8 = 7680
// < 2^13: exact in the tensor core's fp32 accumulation (the mma's D is fresh for every group, so no
// larger value is ever in the accumulator). E4M3 beats s8 here because the group sum comes out as a
// float: the promotion is one FMUL + one FFMA per accumulator instead of I2F + FMUL + FFMA.
//
// ------------------------------------------------------------------------------------------------
// Operand layouts (T = bf16 or fp16, the layer's dtype)
//   qw       uint8 [N, K/2]   the layer's qweight, file layout: byte j of row n = codes k = 2j (low nibble),
//                             2j+1 (high), two's complement. Read in place by TMA.
//   sw       T [K/64, N]      the layer's wscales, file layout.
//   act      uint8 [M_pad, K] one E4M3 code byte per value (kernel A), k permuted inside each 64-group:
//                             act[m, 64g + p] = code(qx[m, 64g + pi(p)]),
//                             p = 32v + 16h + 4t + b  ->  pi(p) = 16t + 8v + 2b + h  (v, h in 0..1; t, b in 0..3)
//   sx       fp32 [K/64, M_pad]  tokens permuted inside each 16-block:
//                             sx[g, 16c + 4t + 2h + e] = scale of token 16c + 8h + 2t + e
//   lora_act fp32 [M_pad, R16], lora_up T [N, R], bias T [N] or none, y T [M, N] row-major.
//   M_pad % 16 == 0 (rows >= M hold zero codes and scales); N % 64 == 0; K % 128 == 0.
//
// Why these permutations. The GEMM is computed transposed: wgmma's M (64 rows per consumer warpgroup)
// is the weight rows n, its N (the tile's BM = 128 or 64 tokens) the tokens m. The weights are the A
// operand, from REGISTERS: wgmma's A fragment of m64k32 8-bit (PTX ISA "wgmma .m64nNk32 register fragment
// A") gives lane (gid, tid) of warp w rows 16w + gid (+8), k 4tid + b (registers a0/a1) and 16 + 4tid + b
// (a2/a3). A lane loads the 8 bytes (16 nibbles) of k 16tid .. 16tid+15 of its row and group straight from
// the checkpoint layout (conflict-free LDS.64 from the TMA tile) and splits them like w4a4_int8.cu's INT8
// flavour: the even nibbles (k = 16tid + 8v + 2b) into k32-MMA v's a0/a1 slot b, the odd ones (k + 1)
// into a2/a3. So MMA v's k-slot 16h + 4t + b holds k = 16t + 8v + 2b + h: pi above. The activations are
// the B operand, from 128B-swizzled shared memory (TMA box {128 bytes, BM tokens}), in that order: kernel
// A writes it. The accumulator fragment gives lane (gid, tid) tokens 8j + 2tid + e (j < BM / 8, e = 0..1);
// their scales, tokens 16c + 2tid + e and 16c + 8 + 2tid + e, are the four consecutive floats at
// 16c + 4tid in the permuted sx: one LDS.128 per 16 tokens.
//
// ------------------------------------------------------------------------------------------------
// Kernel structure: persistent, warp-specialized, 512 threads = 4 warpgroups, one CTA per SM.
//   WG0  producer: one thread issues the TMA loads of each K step (128 k = two 64-groups) into a ring of
//        kStages stages (mbarrier "full" with the byte count, "empty" arrived by the 12 consumer warps);
//        warps 1..3 stage the low-rank branch's operands (below); setmaxnreg gives the rest of its
//        registers to the consumers.
//   WG1..3  consumers: CTA tile 192 weight rows x BM tokens, 64 rows each. Per group: unpack the weight
//        fragments (nibbles -> E4M3 bytes, integer ops), two wgmma m64nBMk32 into a fresh fp32 D, wait, then
//        acc = fma(D * sx, sw * 2^18, acc) for the BM / 2 accumulators (the promotion). A warpgroup's
//        promotion overlaps the other two's wgmmas. (Measured on an H100, 2026-11-22, docs/benchmarks.md:
//        two consumer warpgroups of 192 tokens, with D double-buffered in 32..96-token parts or not, and
//        three with 32-token parts, all ran at 500-600 TOPS; this, the simplest, ran 590-640.)
//   Epilogue: the low-rank branch (below), + bias, one rounding to T, stmatrix.trans into a per-warpgroup
//        staging tile [BM tokens][64 rows], 16-byte coalesced stores of rows m < M (and n < N).
// Tiles are walked m-fastest (tile % m_tiles), so CTAs running at the same time share weight columns.
// BM = 64 where the fewer waves of 64-token tiles make up for their lower efficiency, and split K (two CTAs
// per tile, each over half of K) where SMs would idle at long K (small M; launch_typed's plan). Split K is
// its own kernel instance (kSplitK): the exchange of the partial sums in the same code made ptxas allocate
// the unsplit launches' main loop differently (3-11% slower on an H100); with the template they compile
// exactly as without it.
//
// The low-rank branch on the tensor cores: acc += lora_act . lora_up^T with tf32 wgmmas, 32 ranks (a
// chunk) at a time. lora_up (T: exact in tf32) is the register A operand; lora_act (fp32, 24-bit) is split
// into hi = its top 11 significand bits (low 13 mantissa bits cleared: exact tf32) and lo = lora_act - hi
// (exact in fp32, read as tf32: 11 more bits), [BM tokens][32] tiles, 128B-swizzled; each k8 step is two
// wgmmas (hi, lo) summing into a fresh D per 64-token sub-tile, which is then added to acc. So each product
// carries ~22 bits of lora_act (relative error <= 2^-21), summed in the tensor core's fp32 accumulation:
// within the spec's tolerance (2^-16 of the sum of absolute terms); plain tf32 (2^-11) would not be. (The
// CUDA-core fp32 version cost +53-82% over rank 0 at M >= 4096 on an H200.)
// The producer warpgroup's three idle warps stage each chunk into a buffer of its own while the consumers
// run the tile's main loop (cp.async copies of lora_act and lora_up, then the hi / lo split in place), and
// hand it over by mbarriers (lora_full / lora_empty): the consumers' epilogue reads only shared memory and
// has no barrier between the consumer warpgroups, which keep the offsets in time their main loops overlap
// by. (Until 2026-11-22 the consumers staged lora_act in their epilogue, loading lora_act and lora_up from
// global memory behind barriers of all three warpgroups: +10% over rank 0 on qkv, docs/benchmarks.md.)
// Inside each 8-rank piece the staged lora_act holds ranks 0, 2, 4, 6, 1, 3, 5, 7 in k slots 0..7: a lane's
// two k slots of a step, tid and tid + 4, are then ranks 2tid and 2tid + 1, one 32-bit word of lora_up's row
// (a dot product does not depend on the order of its k). One buffer: a chunk past a tile's first is staged
// while the consumers wait for it (~3 us per tile on an H100).
//
// Numerics of the GEMM part (same as kernel B of w4a4_int8.cu, bit for bit):
//   acc_g = fl(fl(s_g * sx) * sw + acc_{g-1}) in group order g = 0 .. G-1 (kernel B: fmaf(float(sum) * sx,
//   sw, acc)). Here D = s_g * 2^-18 exactly, fl(D * sx) = fl(s_g * sx) * 2^-18 exactly (a power-of-two
//   scaling; it would differ only if s_g * sx * 2^-18 fell below 2^-126, i.e. activation scales below
//   ~2^-95), and sw * 2^18 is exact, so fma(fl(D * sx), sw * 2^18, acc) is kernel B's fma.
//
// Constraints (the host falls back to w4a4_int8.cu's path otherwise, nunchaku_ext/backends/cuda.py):
// sm_90 only (built as sm_90a: wgmma and setmaxnreg are arch-specific), INT4 layers, N % 64 == 0 (the last
// row tile may hold one or two warpgroups of rows past N: TMA zero-fills them, nothing is stored), K % 128 == 0.
// The other archs compile this file's kernel to an empty stub that is never launched.
// ------------------------------------------------------------------------------------------------

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "w4a4_sm90a.h"

// wgmma, setmaxnreg and the arch-specific features exist in the sm_90a compilation pass only.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SVDQ_SM90A_DEVICE 1
#else
#define SVDQ_SM90A_DEVICE 0
#endif

namespace svdq {
namespace sm90a {

constexpr int kConsumers = 3;          // consumer warpgroups, 64 weight rows each
constexpr int kBlockN = kSm90aBlockN;  // weight rows per CTA tile (64 per consumer warpgroup)
static_assert(kBlockN == 64 * kConsumers, "one m64 row block per consumer warpgroup");
constexpr int kBlockM = 128;           // tokens per CTA tile (the wgmmas' N), at most; BM = 64 for few tokens
constexpr int kBlockK = kSm90aBlockK;  // k per pipeline stage: two 64-groups
constexpr int kStages = 4;
constexpr int kThreads = 128 * (1 + kConsumers);  // producer warpgroup + the consumers
constexpr int kConsumerWarps = 4 * kConsumers;
constexpr int kLoraChunk = 32;         // ranks per low-rank step: one 128-byte tf32 row per token

// Shared memory, per stage: activation codes [BM][128 B] (128B-swizzled), weight codes [2 groups][192
// rows][32 B], sx [2][BM] fp32, sw [2][192] T, each in a slot sized for BM = 128. Then per consumer
// warpgroup one output staging tile [BM][64 + 8] T; then one rank chunk of the low-rank branch, staged by the
// producer warpgroup's spare warps: lora_act's tf32 hi and lo tiles and lora_up's chunk.
constexpr int kActBytes = kBlockM * kBlockK;
constexpr int kWBytes = kBlockN * kBlockK / 2;
constexpr int kSxBytes = 2 * kBlockM * 4;
constexpr int kSwBytes = 2 * kBlockN * 2;
constexpr int kStgRow = 64 + 8;  // T per output staging row (64 weight rows + pad: conflict-free stmatrix)
constexpr int kStgBytes = kBlockM * kStgRow * 2;
constexpr int kLaTileBytes = kBlockM * kLoraChunk * 4;   // lora_act's hi or lo tile [BM][32] fp32
constexpr int kLuRow = kLoraChunk + 8;                    // T per staged lora_up row (+ pad: conflict-free reads)
constexpr int kLuBytes = kBlockN * kLuRow * 2;            // lora_up's chunk [192][32 + 8] T
constexpr int kLoraWarps = 3;                              // the producer warpgroup's warps 1..3
constexpr int kOffAct = 0;
constexpr int kOffW = kOffAct + kStages * kActBytes;
constexpr int kOffSx = kOffW + kStages * kWBytes;
constexpr int kOffSw = kOffSx + kStages * kSxBytes;
constexpr int kOffStg = kOffSw + kStages * kSwBytes;
constexpr int kOffLa = kOffStg + kConsumers * kStgBytes;
constexpr int kOffLu = kOffLa + 2 * kLaTileBytes;
constexpr int kOffBar = kOffLu + kLuBytes;
constexpr int kOffFlag = kOffBar + (2 * kStages + 2) * 8;  // split K: whether this CTA is its tile's second part to arrive
constexpr int kSmemBytes = kOffFlag + 16 + 1024;  // + slack to align the base to 1024 (swizzle atom)
static_assert(kOffLa % 1024 == 0, "the staged lora_act tiles start on a swizzle atom");
static_assert(kSmemBytes <= 227 * 1024, "sm_90's shared memory per block");
// Bytes one stage's TMA loads bring for a tile of BM tokens (the shared-memory layout is kBlockM's).
template <int BM>
__host__ __device__ constexpr uint32_t stage_tx_bytes() { return BM * kBlockK + kWBytes + 2 * BM * 4 + kSwBytes; }
constexpr float kCodeScale2 = 262144.f;  // 2^18: E4M3 code values are q * 2^-9, products q * q' * 2^-18

template <typename T> struct Half;
template <> struct Half<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  // The value in the low / high half of a word holding two (lower address = low half).
  static __device__ __forceinline__ float lo_float(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi_float(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo (lower address)
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Half<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float lo_float(uint32_t w) { return __half2float(__ushort_as_half(static_cast<uint16_t>(w))); }
  static __device__ __forceinline__ float hi_float(uint32_t w) { return __half2float(__ushort_as_half(static_cast<uint16_t>(w >> 16))); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

#if SVDQ_SM90A_DEVICE
// ------------------------------------------------------------------------------------------------
// PTX wrappers: shared addresses, mbarriers, TMA, wgmma, named barriers.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}
// 2-D TMA tile load (coordinates innermost first) completing on an mbarrier.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}
// 16-byte asynchronous copy global -> shared (LDGSTS); zeros instead where !in (src-size 0).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(in ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Shared-memory matrix descriptor of a K-major, 128B-swizzled operand: rows of 128 bytes, 8-row swizzle
// atoms 1024 bytes apart (SBO); the leading byte offset is unused for swizzled K-major layouts.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((saddr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;            // LBO (ignored)
  d |= static_cast<uint64_t>(1024 >> 4) << 32;    // SBO
  d |= static_cast<uint64_t>(1) << 62;            // 128B swizzle
  return d;
}

// The warpgroup MMAs on a tile of 64 weight rows x N tokens (N = the CTA's token tile, 64 or 128):
// d[0..N/2-1] (the m64nN fp32 D fragment) = A * B, or += A * B when scale_d != 0. A (64 x k) from 4 registers,
// B (k x N) from a 128B-swizzled K-major shared-memory tile given by its descriptor. e4m3: the GEMM's k32;
// tf32 (on 64-token sub-tiles only): the low-rank up projection's k8.
template <int N> struct Wgmma;
#define SVDQ_WGMMA_M64N64(PTX) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" PTX \
               " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}," \
               " {%32,%33,%34,%35}, %36, p, 1, 1;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))
template <> struct Wgmma<64> {
  static __device__ __forceinline__ void e4m3(float* d, const uint32_t (&a)[4], uint64_t desc, int scale_d) {
    SVDQ_WGMMA_M64N64("wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3");
  }
  static __device__ __forceinline__ void tf32(float* d, const uint32_t (&a)[4], uint64_t desc, int scale_d) {
    SVDQ_WGMMA_M64N64("wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32");
  }
};
#undef SVDQ_WGMMA_M64N64
#define SVDQ_WGMMA_M64N128(PTX) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" PTX \
               " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}," \
               " {%64,%65,%66,%67}, %68, p, 1, 1;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))
template <> struct Wgmma<128> {
  static __device__ __forceinline__ void e4m3(float* d, const uint32_t (&a)[4], uint64_t desc, int scale_d) {
    SVDQ_WGMMA_M64N128("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3");
  }
};
#undef SVDQ_WGMMA_M64N128

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Wait until every committed wgmma group of this warpgroup is done. (Nothing stays in flight past the
// wait: ptxas serializes every wgmma of a kernel whose loop carries a pending one into its next iteration
// and reads accumulators there; docs/kernels.md.)
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// wgmma.mma_async reads its A registers and writes D asynchronously: after wgmma.wait_group the
// compiler must neither have moved reads of D above the wait nor reused A's registers before it. An empty
// asm that "modifies" them, placed after the wait, pins both (asm volatile statements keep their order).
__device__ __forceinline__ void pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void pin(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }

// The tf32 "hi" part of v: its low 13 mantissa bits cleared. v - tf32_hi(v) is exact in fp32 and, read as
// tf32 in turn, keeps 11 more bits: hi + lo carries v to ~2^-21 relative.
__device__ __forceinline__ float tf32_hi(float v) { return __uint_as_float(__float_as_uint(v) & 0xFFFFE000u); }
__device__ __forceinline__ void split_store(uint8_t* hi_dst, uint8_t* lo_dst, float4 v) {
  const float4 hi = make_float4(tf32_hi(v.x), tf32_hi(v.y), tf32_hi(v.z), tf32_hi(v.w));
  *reinterpret_cast<float4*>(hi_dst) = hi;
  *reinterpret_cast<float4*>(lo_dst) = make_float4(v.x - hi.x, v.y - hi.y, v.z - hi.z, v.w - hi.w);
}

// ------------------------------------------------------------------------------------------------
// Weight fragments

// 8 two's-complement nibbles (byte j: k = 2j low nibble, 2j + 1 high) -> two registers of 4 E4M3 bytes,
// lo byte b = the code of k 2b, hi byte b = k 2b + 1. Value q * 2^-9: q >= 0 -> byte q; q < 0 (nibble
// x >= 8, q = x - 16) -> sign | magnitude = 0x80 | (16 - x) = (x ^ 0x8F) + 1. Per byte, no carries.
__device__ __forceinline__ void nibbles_to_e4m3(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t xl = w & 0x0F0F0F0Fu, xh = (w >> 4) & 0x0F0F0F0Fu;
  const uint32_t sl = (w >> 3) & 0x01010101u, sh = (w >> 7) & 0x01010101u;
  lo = (xl ^ (sl * 0x8Fu)) + sl;
  hi = (xh ^ (sh * 0x8Fu)) + sh;
}

// The A registers of group g (0 / 1 within the stage) of the two k32 MMAs, for weight rows row and row + 8
// (tile-local): the lane's 8 bytes = k 16tid .. 16tid+15 of each row, from the stage's [g][128 rows][32 B]
// tile (one LDS.64 per row, conflict-free). Word v (k 16tid + 8v ..) feeds MMA v: a0 / a1 = even k of
// rows row / row + 8, a2 / a3 = odd k (the layout comment at the top).
__device__ __forceinline__ void weight_frags(const uint8_t* w_stage, int g, int row, int tid, uint32_t (&a)[2][4]) {
  const uint2 r0 = *reinterpret_cast<const uint2*>(w_stage + g * (kBlockN * 32) + row * 32 + tid * 8);
  const uint2 r1 = *reinterpret_cast<const uint2*>(w_stage + g * (kBlockN * 32) + (row + 8) * 32 + tid * 8);
  nibbles_to_e4m3(r0.x, a[0][0], a[0][2]);
  nibbles_to_e4m3(r1.x, a[0][1], a[0][3]);
  nibbles_to_e4m3(r0.y, a[1][0], a[1][2]);
  nibbles_to_e4m3(r1.y, a[1][1], a[1][3]);
}
#endif  // SVDQ_SM90A_DEVICE

// ================================================================================================
// The kernel. Lane (gid, tid) of warp w of consumer warpgroup cw owns tile-local weight rows
// row = 64cw + 16w + gid and row + 8, and tokens 8j + 2tid + e (j < BM / 8, e = 0..1):
//   acc[4j + 2i + e] = y[m0 + 8j + 2tid + e, n0 + row + 8i]  (the m64nBM D fragment).
template <typename T, int BM, bool kSplitK>
__global__ void __launch_bounds__(kThreads, 1)
w4a4_gemm_sm90a_kernel(const __grid_constant__ CUtensorMap tm_act, const __grid_constant__ CUtensorMap tm_w,
                       const __grid_constant__ CUtensorMap tm_sx, const __grid_constant__ CUtensorMap tm_sw,
                       const float* __restrict__ lora_act, const T* __restrict__ lora_up, const T* __restrict__ bias,
                       T* __restrict__ y, int M, int N, int K, int M_pad, int R, int R16, int m_tiles, int units,
                       float* __restrict__ split_partials, int* __restrict__ split_counters) {
#if SVDQ_SM90A_DEVICE
  constexpr int kAccs = BM / 2;  // fp32 accumulators per consumer thread (the m64nBM D fragment)
  extern __shared__ uint8_t smem_raw[];
  // The 128B swizzle pattern repeats every 1024 bytes of shared address: align the base to it.
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint8_t* act_s = smem + kOffAct;
  uint8_t* w_s = smem + kOffW;
  float* sx_s = reinterpret_cast<float*>(smem + kOffSx);
  T* sw_s = reinterpret_cast<T*>(smem + kOffSw);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kOffBar);  // stage loaded (TMA bytes arrived)
  uint64_t* empty = full + kStages;                              // stage consumed (every consumer warp)
  uint64_t* lora_full = empty + kStages;  // a rank chunk is staged (every low-rank thread)
  uint64_t* lora_empty = lora_full + 1;   // the chunk is consumed (every consumer warp)
  uint8_t* la_hi = smem + kOffLa;         // the chunk's lora_act: tf32 hi / lo tiles [BM][32], 128B-swizzled
  uint8_t* la_lo = la_hi + kLaTileBytes;
  uint16_t* lu_s = reinterpret_cast<uint16_t*>(smem + kOffLu);  // the chunk's lora_up (T's bits) [192][kLuRow]
  // Work units: tile unit / kSplits, part unit % kSplits of its K steps (a tile's parts are neighbours).
  constexpr int kSplits = kSplitK ? 2 : 1;
  const int k_steps = K / kBlockK / kSplits;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerWarps);
    }
    mbar_init(lora_full, 32 * kLoraWarps);
    mbar_init(lora_empty, kConsumerWarps);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ---------------- producer: one thread streams every tile's K steps through the stage ring
    asm volatile("setmaxnreg.dec.sync.aligned.u32 32;\n" ::: "memory");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tm_act)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&tm_w)) : "memory");
      int stage = 0;
      uint32_t phase = 0;
      for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
        const int tile = unit / kSplits, kt0 = (unit % kSplits) * k_steps;
        const int m0 = (tile % m_tiles) * BM, n0 = (tile / m_tiles) * kBlockN;
        for (int kt = kt0; kt < kt0 + k_steps; ++kt) {
          mbar_wait(&empty[stage], phase ^ 1);
          mbar_expect_tx(&full[stage], stage_tx_bytes<BM>());
          // Out-of-range boxes (tokens past M_pad) are zero-filled by the TMA unit.
          tma_load_2d(act_s + stage * kActBytes, &tm_act, &full[stage], kt * kBlockK, m0);
          tma_load_2d(w_s + stage * kWBytes, &tm_w, &full[stage], kt * 64, n0);                    // group 2kt
          tma_load_2d(w_s + stage * kWBytes + kBlockN * 32, &tm_w, &full[stage], kt * 64 + 32, n0);  // 2kt + 1
          tma_load_2d(sx_s + stage * (2 * kBlockM), &tm_sx, &full[stage], m0, kt * 2);  // [2][BM]
          tma_load_2d(sw_s + stage * (2 * kBlockN), &tm_sw, &full[stage], n0, kt * 2);
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    } else if (threadIdx.x >= 32 && R > 0) {
      // ---------------- the low-rank warps: stage every unit's rank chunks (one buffer) while the consumers
      // run the main loop: lora_act as tf32 hi / lo tiles in the k order of the top comment, lora_up as it is.
      // All copies are issued at once (cp.async), then each thread splits the lora_act pieces it copied, in
      // place. Split K: both parts' units are staged (which one finishes the tile is known only at its end);
      // the other part's consumers just release them.
      const int lt = threadIdx.x - 32;  // 0 .. 32 * kLoraWarps - 1
      const bool up_async = R % 8 == 0 && reinterpret_cast<uintptr_t>(lora_up) % 16 == 0;
      uint32_t chunk = 0;  // chunks staged so far: its parity is the buffer's phase
      for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
        const int tile = unit / kSplits;
        const int m0 = (tile % m_tiles) * BM, n0 = (tile / m_tiles) * kBlockN;
        for (int r0 = 0; r0 < R; r0 += kLoraChunk, ++chunk) {
          mbar_wait(lora_empty, (chunk & 1) ^ 1);
          for (int e = lt; e < BM * 4; e += 32 * kLoraWarps) {  // BM tokens x 4 pieces of 8 ranks
            const int tok = e >> 2, p = e & 3, m = m0 + tok, r = r0 + 8 * p;
            const bool in = m < M_pad && r < R16;  // R16 % 16 == 0: all 8 ranks in
            const float* src = in ? lora_act + static_cast<int64_t>(m) * R16 + r : lora_act;
            // The 128B swizzle: 16-byte unit q of row tok at q ^ (tok % 8). Out of range: zeros.
            cp_async16(la_hi + tok * 128 + (((2 * p) ^ (tok & 7)) << 4), src, in);
            cp_async16(la_hi + tok * 128 + (((2 * p + 1) ^ (tok & 7)) << 4), src + 4, in);
          }
          for (int e = lt; e < kBlockN * 4; e += 32 * kLoraWarps) {  // 192 rows x 4 pieces of 8 ranks
            const int rl = e >> 2, p = e & 3, n = n0 + rl, r = r0 + 8 * p;
            const uint16_t* src = reinterpret_cast<const uint16_t*>(lora_up) + static_cast<int64_t>(n) * R + r;
            uint16_t* dst = lu_s + rl * kLuRow + 8 * p;
            if (up_async) {
              const bool in = n < N && r < R;  // R % 8 == 0: all 8 ranks in
              cp_async16(dst, in ? src : reinterpret_cast<const uint16_t*>(lora_up), in);
            } else {
#pragma unroll
              for (int j = 0; j < 8; ++j) dst[j] = n < N && r + j < R ? src[j] : 0;
            }
          }
          cp_async_wait_all();
          for (int e = lt; e < BM * 4; e += 32 * kLoraWarps) {  // the pieces this thread copied: split, k order (top)
            const int tok = e >> 2, p = e & 3;
            const int off0 = tok * 128 + (((2 * p) ^ (tok & 7)) << 4), off1 = tok * 128 + (((2 * p + 1) ^ (tok & 7)) << 4);
            const float4 a = *reinterpret_cast<const float4*>(la_hi + off0), b = *reinterpret_cast<const float4*>(la_hi + off1);
            split_store(la_hi + off0, la_lo + off0, make_float4(a.x, a.z, b.x, b.z));  // ranks 8p + 0, 2, 4, 6
            split_store(la_hi + off1, la_lo + off1, make_float4(a.y, a.w, b.y, b.w));  // ranks 8p + 1, 3, 5, 7
          }
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // generic-proxy stores -> wgmma reads
          mbar_arrive(lora_full);
        }
      }
    }
    return;
  }

  // ---------------- consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n" ::: "memory");  // 128 x 32 + 384 x 160 = 64K
  const int cw = wg - 1;
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int gid = lane >> 2, tid = lane & 3;
  const int row = cw * 64 + warp * 16 + gid;
  const int t = threadIdx.x % 128;
  uint8_t* stg = smem + kOffStg + cw * kStgBytes;
  int stage = 0;
  uint32_t phase = 0;

  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int tile = unit / kSplits;
    const int m0 = (tile % m_tiles) * BM, n0 = (tile / m_tiles) * kBlockN;
    // Rank chunks the low-rank warps staged before this unit's: their parity is the buffer's phase.
    const uint32_t lora_chunk0 = (unit - blockIdx.x) / gridDim.x * ((R + kLoraChunk - 1) / kLoraChunk);
    float acc[kAccs];
#pragma unroll
    for (int i = 0; i < kAccs; ++i) acc[i] = 0.f;

    // ---------------- main loop: per 64-group, two wgmma k32 into a fresh D, wait, promote. A warpgroup's
    // promotion overlaps the other warpgroups' wgmmas: three of them keep the tensor cores fed. (The count
    // runs down to 0: compared with k_steps, ptxas spilled it in every K step, and scheduled the loop 4%
    // slower on an H100; docs/benchmarks.md.)
    for (int kt = k_steps; kt > 0; --kt) {
      mbar_wait(&full[stage], phase);
      const float* sx_stage = sx_s + stage * (2 * kBlockM);
      const T* sw_stage = sw_s + stage * (2 * kBlockN);
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        uint32_t a[2][4];
        weight_frags(w_s + stage * kWBytes, g, row, tid, a);
        float d[kAccs];
        // The group's 64 k: bytes 64g .. 64g + 63 of each 128-byte activation row; +32 bytes (descriptor
        // +2 in 16-byte units) for the second k32.
        const uint64_t desc = desc_sw128(smem_u32(act_s + stage * kActBytes) + g * 64);
        wgmma_fence();
        Wgmma<BM>::e4m3(d, a[0], desc, 0);
        Wgmma<BM>::e4m3(d, a[1], desc + 2, 1);
        wgmma_commit();
        const float sw0 = Half<T>::to_float(sw_stage[g * kBlockN + row]) * kCodeScale2;
        const float sw1 = Half<T>::to_float(sw_stage[g * kBlockN + row + 8]) * kCodeScale2;
        wgmma_wait_all();
#pragma unroll
        for (int i = 0; i < kAccs; ++i) pin(d[i]);
#pragma unroll
        for (int v = 0; v < 2; ++v)
#pragma unroll
          for (int i = 0; i < 4; ++i) pin(a[v][i]);
        // Promotion: acc = fma(D * sx, sw * 2^18, acc) = fma(fl(sum * sx), sw, acc) (Numerics, top).
        const float* sx_g = sx_stage + g * BM;
#pragma unroll
        for (int c = 0; c < BM / 16; ++c) {
          const float4 s = *reinterpret_cast<const float4*>(sx_g + 16 * c + 4 * tid);  // tokens (16c | 16c+8) + 2tid + e
          float* ac = acc + 8 * c;
          const float* dd = d + 8 * c;
          ac[0] = fmaf(dd[0] * s.x, sw0, ac[0]);
          ac[1] = fmaf(dd[1] * s.y, sw0, ac[1]);
          ac[2] = fmaf(dd[2] * s.x, sw1, ac[2]);
          ac[3] = fmaf(dd[3] * s.y, sw1, ac[3]);
          ac[4] = fmaf(dd[4] * s.z, sw0, ac[4]);
          ac[5] = fmaf(dd[5] * s.w, sw0, ac[5]);
          ac[6] = fmaf(dd[6] * s.z, sw1, ac[6]);
          ac[7] = fmaf(dd[7] * s.w, sw1, ac[7]);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[stage]);  // the stage is consumed
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }

    // ---------------- split K (the kSplitK instances): both parts store their fp32 sums and count themselves in
    // on the tile's counter (after a fence, as kernel A does); the second to arrive adds the two stored sets,
    // part 0's + part 1's (the same bits whichever arrives second), finishes the tile and sets the counter
    // back to 0 for the next launch. Adding from memory, not into the live accumulators, keeps ptxas from
    // spilling them.
    if constexpr (kSplitK) {
      const int ct = threadIdx.x - 128;  // consumer thread 0 .. 128 * kConsumers - 1
      constexpr int kStride = 128 * kConsumers;
      float* parts = split_partials + static_cast<int64_t>(tile) * (2 * kAccs * kStride);
      float* mine = parts + (unit % kSplits) * (kAccs * kStride);
#pragma unroll
      for (int i = 0; i < kAccs; ++i) __stcg(mine + i * kStride + ct, acc[i]);
      __threadfence();
      named_bar_sync(1, 128 * kConsumers);
      volatile int* second = reinterpret_cast<volatile int*>(smem + kOffFlag);
      if (ct == 0) *second = atomicAdd(split_counters + tile, 1) == 1;
      named_bar_sync(1, 128 * kConsumers);
      if (!*second) {  // the other part finishes the tile: release the chunks staged for this unit
        for (uint32_t c = lora_chunk0; c < lora_chunk0 + (R + kLoraChunk - 1) / kLoraChunk; ++c) {
          mbar_wait(lora_full, c & 1);
          __syncwarp();
          if (lane == 0) mbar_arrive(lora_empty);
        }
        continue;
      }
      __threadfence();
#pragma unroll
      for (int i = 0; i < kAccs; ++i) acc[i] = __ldcg(parts + i * kStride + ct) + __ldcg(parts + (kAccs + i) * kStride + ct);
      if (ct == 0) split_counters[tile] = 0;
    }


    // ---------------- epilogue 1: low-rank branch on the tensor cores, acc += lora_act . lora_up^T (top
    // comment), from the chunks the low-rank warps staged; no barrier between the consumer warpgroups (each
    // releases a chunk on its own), so they keep the offsets in time their main loops overlap by.
    if (R > 0) {
      uint32_t chunk = lora_chunk0;
      for (int r0 = 0; r0 < R; r0 += kLoraChunk, ++chunk) {
        // lora_up's tf32 m64k8 fragments: u[s][i] = row + 8(i & 1) at k slot tid + 4(i >> 1) of step s, which
        // holds rank 8s + 2tid + (i >> 1) (the staged k order, top comment).
        uint32_t u[kLoraChunk / 8][4];
        mbar_wait(lora_full, chunk & 1);
#pragma unroll
        for (int s = 0; s < kLoraChunk / 8; ++s)
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // rows row, row + 8: ranks 8s + 2tid and 8s + 2tid + 1, one word
            const uint32_t w = *reinterpret_cast<const uint32_t*>(lu_s + (row + 8 * h) * kLuRow + 8 * s + 2 * tid);
            u[s][h] = __float_as_uint(Half<T>::lo_float(w));
            u[s][2 + h] = __float_as_uint(Half<T>::hi_float(w));
          }
        // Per 64-token sub-tile: the chunk's products summed by the tensor core into a fresh D, then added
        // to acc (acc itself as the wgmma's D would pin it to the instruction's register blocks: ptxas spills).
#pragma unroll
        for (int sub = 0; sub < BM / 64; ++sub) {
          float d[32];
          const uint32_t off = sub * (64 * 128);
          wgmma_fence();
#pragma unroll
          for (int s = 0; s < kLoraChunk / 8; ++s) {
            Wgmma<64>::tf32(d, u[s], desc_sw128(smem_u32(la_hi) + off) + 2 * s, s);
            Wgmma<64>::tf32(d, u[s], desc_sw128(smem_u32(la_lo) + off) + 2 * s, 1);
          }
          wgmma_commit();
          wgmma_wait_all();
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            pin(d[i]);
            acc[32 * sub + i] += d[i];
          }
        }
#pragma unroll
        for (int s = 0; s < kLoraChunk / 8; ++s)
#pragma unroll
          for (int i = 0; i < 4; ++i) pin(u[s][i]);
        __syncwarp();
        if (lane == 0) mbar_arrive(lora_empty);  // this warp's wgmmas are done reading the chunk
      }
    }

    // ---------------- epilogue 2: bias, one rounding, transpose through shared memory, coalesced stores
    const bool rows_in = n0 + cw * 64 < N;  // N % 64 == 0: a warpgroup's 64 rows are all in or all out
    const float b0 = bias != nullptr && rows_in ? Half<T>::to_float(bias[n0 + row]) : 0.f;
    const float b1 = bias != nullptr && rows_in ? Half<T>::to_float(bias[n0 + row + 8]) : 0.f;
    named_bar_sync(2 + cw, 128);  // the staging area is free
    {
      // stmatrix.x4.trans: matrix i (registers v[i]) = tokens 8(j + i/2) .. +7 x weight rows 8(i%2) .. +7
      // of the warp's 16; lanes 8i .. 8i+7 give the addresses of its 8 token rows in the [token][row] tile.
      const int q = lane >> 3, r = lane & 7;
#pragma unroll
      for (int j = 0; j < kAccs / 4; j += 2) {
        uint32_t v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float b = (i & 1) ? b1 : b0;
          v[i] = Half<T>::pack2(acc[4 * j + 2 * i] + b, acc[4 * j + 2 * i + 1] + b);
        }
        const int tok = 8 * (j + (q >> 1)) + r;
        const uint32_t addr = smem_u32(stg + (tok * kStgRow + warp * 16 + 8 * (q & 1)) * 2);
        asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr),
                     "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
                     : "memory");
      }
    }
    named_bar_sync(2 + cw, 128);
#pragma unroll 4
    for (int it = 0; it < BM / 16; ++it) {  // 16 tokens x 8 16-byte pieces per pass
      const int tok = it * 16 + (t >> 3), c = t & 7, m = m0 + tok;
      const uint4 val = *reinterpret_cast<const uint4*>(stg + (tok * kStgRow + c * 8) * 2);
      if (m < M && rows_in) *reinterpret_cast<uint4*>(y + static_cast<int64_t>(m) * N + n0 + cw * 64 + c * 8) = val;
    }
  }
#endif  // SVDQ_SM90A_DEVICE
}

}  // namespace sm90a

// ================================================================================================
// Host

namespace {

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) return nullptr;
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }
  return fn;
}

// A 2-D tensor map: `inner` x `outer` elements, rows `row_bytes` apart, box `box_inner` x `box_outer`.
bool make_map(CUtensorMap* map, CUtensorMapDataType dtype, const void* ptr, uint64_t inner, uint64_t outer,
              uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const uint64_t dims[2] = {inner, outer};
  const uint64_t strides[1] = {row_bytes};
  const uint32_t box[2] = {box_inner, box_outer};
  const uint32_t elem_strides[2] = {1, 1};
  return encode(map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int BM, bool kSplitK>
cudaError_t launch_tiles(const GemmArgs& a, int sms, cudaStream_t stream) {
  using namespace sm90a;
  const CUtensorMapDataType half_type =
      std::is_same<T, __nv_bfloat16>::value ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  CUtensorMap tm_act, tm_w, tm_sx, tm_sw;
  const uint64_t G = a.K / kGroup;
  if (!make_map(&tm_act, CU_TENSOR_MAP_DATA_TYPE_UINT8, a.act_packed, a.K, a.M_pad, a.K, kBlockK, BM,
                CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map(&tm_w, CU_TENSOR_MAP_DATA_TYPE_UINT8, a.qweight, a.K / 2, a.N, a.K / 2, 32, kBlockN,
                CU_TENSOR_MAP_SWIZZLE_NONE) ||  // one 64-group (32 bytes) of the tile's rows per box
      !make_map(&tm_sx, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, a.act_scales, a.M_pad, G, a.M_pad * 4ull, BM, 2,
                CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !make_map(&tm_sw, half_type, a.wscales, a.N, G, a.N * 2ull, kBlockN, 2, CU_TENSOR_MAP_SWIZZLE_NONE))
    return cudaErrorInvalidValue;
  auto kernel = w4a4_gemm_sm90a_kernel<T, BM, kSplitK>;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (e != cudaSuccess) return e;
  if (kSplitK && (a.split_partials == nullptr || a.split_counters == nullptr)) return cudaErrorInvalidValue;
  const int m_tiles = (a.M + BM - 1) / BM;
  const int units = m_tiles * ((a.N + kBlockN - 1) / kBlockN) * (kSplitK ? 2 : 1);
  kernel<<<units < sms ? units : sms, kThreads, kSmemBytes, stream>>>(
      tm_act, tm_w, tm_sx, tm_sw, a.lora_act, static_cast<const T*>(a.lora_up), static_cast<const T*>(a.bias),
      static_cast<T*>(a.out), a.M, a.N, a.K, a.M_pad, a.R, a.R16, m_tiles, units, a.split_partials,
      a.split_counters);
  return cudaGetLastError();
}

// The launch plan: 128-token tiles; 64-token ones; or 128-token tiles over half of K each (split K), where
// waves x unit time is lowest. One CTA per SM, so a launch takes about waves x the time of one unit; a
// 64-token tile takes ~0.65 of a 128-token one (H100, 2026-11-22, the GEMM alone at rank 32, M = 256 / 512 /
// 1024 x qkv, proj, fc1, fc2: 0.60-0.69; this picked the faster width in all 12 cases: e.g. qkv M = 256 41 us
// on 128 instead of 50 on 64, proj M = 512 28 us on 64 instead of 40, fc2 M = 1024 126 us on 128 instead of
// 161), and half of a 128-token tile's K 0.5 + 0.22 x 3072 / K of it (its fixed costs and the exchange of
// the partial sums: ~0.72 at K = 3072, ~0.57 at K = 12288 measured), so only long K splits; and only where
// 128-token tiles leave SMs idle (the regime measured: the exchange grows with M).
struct Plan {
  int bm;
  bool split;
  int64_t tiles;  // tiles of bm tokens
};

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 0;
  return sms;
}

Plan plan_for(int M, int N, int K, int sms) {
  using namespace sm90a;
  const int64_t row_tiles = (N + kBlockN - 1) / kBlockN;
  const int64_t tiles128 = (M + kBlockM - 1) / kBlockM * row_tiles, tiles64 = (M + 63) / 64 * row_tiles;
  auto waves = [&](int64_t units) { return (units + sms - 1) / sms; };
  Plan best{kBlockM, false, tiles128};
  int64_t best_cost = waves(tiles128) * 100;
  if (waves(tiles64) * 65 < best_cost) {
    best = Plan{64, false, tiles64};
    best_cost = waves(tiles64) * 65;
  }
  if (tiles128 < sms && (K / kBlockK) % 2 == 0 && waves(2 * tiles128) * (50 * int64_t{K} + 22 * 3072) < best_cost * K)
    best = Plan{kBlockM, true, tiles128};
  return best;
}

template <typename T>
cudaError_t launch_typed(const GemmArgs& a, cudaStream_t stream) {
  using namespace sm90a;
  if (a.N % kSm90aNMultiple || a.K % kBlockK || a.M_pad % 16 || a.M > a.M_pad || a.M <= 0) return cudaErrorInvalidValue;
  const int sms = sm_count();
  if (sms <= 0) return cudaErrorInvalidDevice;
  const Plan plan = plan_for(a.M, a.N, a.K, sms);
  if (plan.split) return launch_tiles<T, kBlockM, true>(a, sms, stream);
  return plan.bm == 64 ? launch_tiles<T, 64, false>(a, sms, stream) : launch_tiles<T, kBlockM, false>(a, sms, stream);
}

}  // namespace

cudaError_t sm90a_gemm_workspace(int M, int N, int K, int64_t* partial_floats, int* counters) {
  const int sms = sm_count();
  if (sms <= 0) return cudaErrorInvalidDevice;
  const Plan plan = plan_for(M, N, K, sms);
  *partial_floats = plan.split ? plan.tiles * 2 * (plan.bm / 2) * 128 * sm90a::kConsumers : 0;  // both parts' sums
  *counters = plan.split ? static_cast<int>(plan.tiles) : 0;  // arrivals per tile
  return cudaSuccess;
}

cudaError_t launch_w4a4_gemm_sm90a(const GemmArgs& args, bool is_bf16, cudaStream_t stream) {
  return is_bf16 ? launch_typed<__nv_bfloat16>(args, stream) : launch_typed<__half>(args, stream);
}

}  // namespace svdq
