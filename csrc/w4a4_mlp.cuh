// The fused MLP pair (DESIGN.md §4): fc1 -> GELU(tanh) -> fc2, where the 12288-wide hidden
// activation h is written only as fc2's quantized input, never in 16 bits. Included at the end of
// w4a4_int8.cu (it reuses kernel B's main loop and kernel A's quantizer from there).
//
//   w4a4_mlp_fc1_kernel  kernel B for fc1 (signed INT4 input, any INT4 flavour Mma) with another
//                        epilogue. Per 128 x 128 block tile of h:
//     1. y = acc + bias (w4a4_block_acc: quantized branch + low-rank branch, fp32), then
//        h = round(gelu_tanh(float(round(y)))), round = to the activation dtype. That is exactly what
//        the unfused path computes (fc1's output rounded once, torch's GELU(tanh) evaluated in fp32 on
//        it and rounded), so fc2 sees the same h as in F.gelu(fc1(x)); only tanhf may differ from
//        torch's by its last bits. h goes to shared memory as 16-bit values (34 KB, dynamic).
//     2. Each warp takes two (16-row tile, 64-column group) units of the tile: lanes load h at the
//        k their runs own (Mma::Layout, as kernel A loads x), apply
//        numerics.smooth_input(h, smooth2, unsigned=True) (fp32 add of 0.171875, IEEE division) and
//        run kernel A's quantizer (quantize_lane_chunk): codes and scales bit-identical to
//        numerics.quantize_act_int4(..., unsigned=True) on this h, stored where fc2's GEMM reads them.
//     3. The tile's part of lora_act2 = h . lora_down2^T: 2 threads per row, 8 ranks at a time,
//        h from shared memory (16-byte reads; the row padding puts 8 consecutive rows in distinct
//        banks), lora_down2 staged in shared memory 16 ranks x 128 columns at a time as fp32 (one
//        round trip to L2 per chunk instead of one per load; read by broadcast). Written to this
//        column block's slice of a workspace.
//   sum_lora_partials_kernel  lora_act2 = the sum of the column blocks' parts, in block order.
//
// Why a workspace and a second launch, not fp32 atomics: atomics would add the 96 parts (FLUX:
// 12288 / 128) in whatever order blocks finish, so lora_act2 and fc2's output would change from run
// to run. The fixed-order sum is deterministic; its cost is the workspace, N1/128 x M_pad x R16 fp32
// (FLUX, M = 4608, rank 32: 57 MB written and read once, half the traffic of a 16-bit h).
//
// Rows past M (padding of the tile) get zero codes, scales and lora_act2, as kernel A writes them;
// columns past N1 (a hidden width not a multiple of 128) are skipped: their 64-groups do not exist.
#pragma once
#include "w4a4_mlp.h"

namespace svdq {

constexpr int kHiddenStride = kGemmBlockN + 8;  // elements per shared row of h (bank spread, see above)
constexpr int kMlpHiddenSmem = kGemmBlockM * kHiddenStride * 2;  // 16-bit h: 34,816 bytes
constexpr float kUnsignedShift = 0.171875f;    // numerics.UNSIGNED_SHIFT
constexpr int kLoraDownRanks = 8;              // ranks one thread accumulates at a time in step 3
constexpr int kDownChunk = 16;                 // ranks of lora_down2 staged in shared memory at a time
constexpr int kMlpSmem = kMlpHiddenSmem + kDownChunk * kGemmBlockN * 4;  // + 8 KB of lora_down2

// GELU(tanh) as torch evaluates it for a 16-bit tensor on the GPU: in fp32, 0.5 x (1 + tanh(
// sqrt(2/pi) (x + 0.044715 x^3))), with tanhf.
__device__ __forceinline__ float gelu_tanh(float x) {
  const float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * (x * x * x));
  return 0.5f * x * (1.f + tanhf(inner));
}

template <typename T, typename Mma>
__global__ void __launch_bounds__(kGemmThreads, Mma::kMinBlocksPerSm)
w4a4_mlp_fc1_kernel(const MlpFc1Args a) {
  using Layout = typename Mma::Layout;
  extern __shared__ __align__(16) unsigned char mlp_smem[];
  auto h_s = reinterpret_cast<T (*)[kHiddenStride]>(mlp_smem);  // [kGemmBlockM][kHiddenStride]
  auto d_s = reinterpret_cast<float (*)[kGemmBlockN]>(mlp_smem + kMlpHiddenSmem);  // [kDownChunk][kGemmBlockN]

  const GemmArgs& f = a.fc1;
  float acc[kWarpTilesM][kWarpTilesN][4];
  w4a4_block_acc<T, false, Mma>(f, acc);
  const GemmLane t;
  const int M = f.M, N1 = f.N, M_pad = f.M_pad;
  T* hidden_out = static_cast<T*>(a.hidden_out);

  // ---------------- 1. bias, GELU, h into shared memory (zeros past M and N1)
#pragma unroll
  for (int j = 0; j < kWarpTilesN; ++j) {
    const int lc = t.warp_n * kWarpN + j * 8 + t.tid * 2;  // column within the tile (an even pair)
    const int col = t.block_col + lc;
    const float2 bv = col < N1 ? load_bias_pair<T>(f.bias, col) : make_float2(0.f, 0.f);
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = t.warp_m * kWarpM + i * 16 + t.gid + 8 * h;
        const int row = t.block_row + lr;
        uint32_t pair = 0u;
        if (row < M && col < N1) {  // N1 is even: col + 1 < N1 too
          const float y0 = Dtype<T>::to_float(Dtype<T>::from_float(acc[i][j][2 * h] + bv.x));
          const float y1 = Dtype<T>::to_float(Dtype<T>::from_float(acc[i][j][2 * h + 1] + bv.y));
          pair = Dtype<T>::pack2(gelu_tanh(y0), gelu_tanh(y1));
          if (hidden_out) *reinterpret_cast<uint32_t*>(hidden_out + static_cast<int64_t>(row) * N1 + col) = pair;
        }
        *reinterpret_cast<uint32_t*>(&h_s[lr][lc]) = pair;
      }
    }
  }
  __syncthreads();

  // ---------------- 2. fc2's input: smooth, quantize, pack in fc2's fragment layout
  const int G2 = N1 / kGroup;
  constexpr int kTileGroups = kGemmBlockN / kGroup;
  for (int u = t.warp; u < (kGemmBlockM / 16) * kTileGroups; u += kGemmThreads / 32) {
    const int mt = u / kTileGroups, gl = u % kTileGroups;
    const int g2 = t.block_col / kGroup + gl;
    if (g2 >= G2) continue;  // warp-uniform: past a hidden width that is not a multiple of the tile
    float xs[2][4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = Layout::run_k(j, t.tid);
      float smv[4];
      load4_float(static_cast<const T*>(a.smooth2) + g2 * kGroup + k, smv);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = mt * 16 + t.gid + 8 * h;
        const uint2 raw = *reinterpret_cast<const uint2*>(&h_s[lr][gl * kGroup + k]);
        const T* v = reinterpret_cast<const T*>(&raw);
        const bool row_valid = t.block_row + lr < M;
#pragma unroll
        for (int b = 0; b < 4; ++b)  // numerics.smooth_input(unsigned=True): fp32 add, IEEE division
          xs[h][j][b] = row_valid ? __fdiv_rn(__fadd_rn(Dtype<T>::to_float(v[b]), kUnsignedShift), smv[b]) : 0.f;
      }
    }
    uint32_t words[2][2];
    float my_scale[2];
    quantize_lane_chunk<true, Layout>(xs, t.tid, words, my_scale);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = t.block_row + mt * 16 + t.gid + 8 * h;
      store_words<Layout>(a.act2_packed + row * (N1 / 2) + g2 * (kGroup / 2), t.tid, words[h][0], words[h][1]);
      if (t.tid == 0) a.act2_scales[static_cast<int64_t>(g2) * M_pad + row] = my_scale[h];
    }
  }

  // ---------------- 3. this column block's part of lora_act2 = h . lora_down2^T (h_s is unchanged)
  if (a.R2 > 0) {
    constexpr int kThreadsPerRow = kGemmThreads / kGemmBlockM;
    static_assert(kThreadsPerRow * kGemmBlockM == kGemmThreads && (kGemmBlockM % 32) == 0, "rank split must be warp-uniform");
    static_assert(kThreadsPerRow * kLoraDownRanks == kDownChunk, "a chunk's ranks are split between a row's threads");
    const int lr = threadIdx.x % kGemmBlockM, part = threadIdx.x / kGemmBlockM;
    const int cols = min(kGemmBlockN, N1 - t.block_col);  // a multiple of 64
    float* dst = a.lora_partial + (static_cast<int64_t>(blockIdx.x) * M_pad + t.block_row + lr) * a.R2_16;
    for (int r0 = 0; r0 < a.R2_16; r0 += kDownChunk) {  // R2_16 is a multiple of kDownChunk
      __syncthreads();  // the previous chunk is consumed
      constexpr int kVecs = kGemmBlockN / 4;  // float4 per staged rank
      for (int e = threadIdx.x; e < kDownChunk * kVecs; e += kGemmThreads) {
        const int r = e / kVecs, c = 4 * (e % kVecs);
        float v[4] = {0.f, 0.f, 0.f, 0.f};  // ranks past R2, columns past N1: zero
        if (r0 + r < a.R2 && c < cols)
          load4_float(static_cast<const T*>(a.lora_down2) + static_cast<int64_t>(r0 + r) * N1 + t.block_col + c, v);
        *reinterpret_cast<float4*>(&d_s[r][c]) = make_float4(v[0], v[1], v[2], v[3]);
      }
      __syncthreads();
      float s[kLoraDownRanks];
#pragma unroll
      for (int r = 0; r < kLoraDownRanks; ++r) s[r] = 0.f;
      for (int c = 0; c < cols; c += 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(&h_s[lr][c]);
        const T* hv = reinterpret_cast<const T*>(&raw);
        float hf[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) hf[e] = Dtype<T>::to_float(hv[e]);
#pragma unroll
        for (int r = 0; r < kLoraDownRanks; ++r) {
          const float* d = &d_s[part * kLoraDownRanks + r][c];  // the warp reads one address: a broadcast
          const float4 d0 = *reinterpret_cast<const float4*>(d), d1 = *reinterpret_cast<const float4*>(d + 4);
          const float dv[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) s[r] = fmaf(hf[e], dv[e], s[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kLoraDownRanks; ++r) dst[r0 + part * kLoraDownRanks + r] = s[r];
    }
  }
}

// lora_act2[i] = sum over column blocks b, in order, of partial[b][i] (i over M_pad x R2_16).
__global__ void sum_lora_partials_kernel(const float* __restrict__ partial, int blocks, int64_t count,
                                         float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += __ldg(partial + b * count + i);
  out[i] = s;
}

template <typename T, typename Mma>
static cudaError_t launch_mlp_fc1_typed(const MlpFc1Args& a, cudaStream_t stream) {
  auto kernel = w4a4_mlp_fc1_kernel<T, Mma>;
  // h and lora_down2's chunk (42 KB, dynamic) and w4a4_block_acc's low-rank staging (17 KB, static)
  // pass the 48 KB default; 59 KB fits every arch's opt-in (sm_75: 64 KB).
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMlpSmem);
  if (e != cudaSuccess) return e;
  const dim3 grid = gemm_grid(a.fc1);
  kernel<<<grid, kGemmThreads, kMlpSmem, stream>>>(a);
  e = cudaGetLastError();
  if (e != cudaSuccess || a.R2 == 0) return e;
  const int64_t count = static_cast<int64_t>(a.fc1.M_pad) * a.R2_16;
  constexpr int kThreads = 256;
  sum_lora_partials_kernel<<<static_cast<unsigned>((count + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      a.lora_partial, static_cast<int>(grid.x), count, a.lora_act2);
  return cudaGetLastError();
}

cudaError_t launch_w4a4_mlp_fc1(const MlpFc1Args& a, bool is_bf16, MmaPath path, cudaStream_t stream) {
  return with_mma_flavour(path, [&](auto mma) {
    using Mma = decltype(mma);
    if constexpr (kE2M1Codes<Mma>) {
      return cudaErrorInvalidValue;  // NVFP4 MLPs run as two linears (backends/cuda.py)
    } else {
      return is_bf16 ? launch_mlp_fc1_typed<__nv_bfloat16, Mma>(a, stream) : launch_mlp_fc1_typed<__half, Mma>(a, stream);
    }
  });
}

}  // namespace svdq
