// Plain-pointer interface of the sm_90a W4A4 path (wgmma, csrc/w4a4_sm90a.cu; its kernel A lives in
// w4a4_int8.cu). Layouts: the top comment of w4a4_sm90a.cu.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "w4a4_int8.h"

namespace svdq {

// The wgmma GEMM's tile: 192 weight rows x 128 tokens, 128 k (two 64-groups) per pipeline stage. It takes
// N % 64 == 0 (the last row tile may be partial, in whole 64-row warpgroup blocks) and K % 128 == 0.
constexpr int kSm90aBlockN = 192;
constexpr int kSm90aBlockK = 128;
constexpr int kSm90aNMultiple = 64;

// Kernel A for this path: QuantizeArgs as for launch_quantize_act_lora_down, except
//   act_packed  uint8 [M_pad, K]: one E4M3 code byte per value, k permuted inside each 64-group;
//   act_scales  fp32 [K/64, M_pad]: tokens permuted inside each 16-block.
// K % 64 == 0 (the GEMM needs K % 128 == 0). Compiled for every arch (plain CUDA), launched on sm_90.
cudaError_t launch_quantize_act_e4m3(const QuantizeArgs& args, bool input_is_bf16, bool act_unsigned,
                                     cudaStream_t stream);

// The split-K workspace the GEMM below needs for this shape on the current device (small M and long K: two
// CTAs per 128-token tile, each over half of K; launch plan in w4a4_sm90a.cu): partial_floats fp32 values and
// `counters` int32 counters (zero-initialized once: every launch leaves them zero). 0 = none.
cudaError_t sm90a_gemm_workspace(int M, int N, int K, int64_t* partial_floats, int* counters);

// The GEMM with the fused epilogue, GemmArgs as for launch_w4a4_gemm (act_packed / act_scales as the
// kernel above writes them). N % 64 == 0, K % 128 == 0, M_pad % 16 == 0. Only the sm_90a build has the
// kernel's body (the other archs hold an empty stub): the caller checks that the device is sm_90.
cudaError_t launch_w4a4_gemm_sm90a(const GemmArgs& args, bool is_bf16, cudaStream_t stream);

}  // namespace svdq
