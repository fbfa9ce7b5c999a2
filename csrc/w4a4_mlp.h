// Plain-pointer interface of the fused MLP kernel (w4a4_mlp.cuh): fc1's W4A4 GEMM whose epilogue
// applies GELU(tanh) and quantizes the result as fc2's (unsigned INT4) input.
#pragma once
#include "w4a4_int8.h"

namespace svdq {

struct MlpFc1Args {
  GemmArgs fc1;             // fc1's operands as for launch_w4a4_gemm (signed INT4 input; out unused);
                            // fc1.N = the hidden width N1 = fc2's K, a multiple of 64
  const void* smooth2;      // fc2's smooth, T [N1]
  const void* lora_down2;   // fc2's lora_down, T [R2, N1]
  int R2, R2_16;            // fc2's rank, and it rounded up to 16
  uint8_t* act2_packed;     // fc2's input codes [M_pad, N1/2], as kernel A writes them
  float* act2_scales;       // [N1/64][M_pad]
  float* lora_partial;      // workspace [ceil(N1/128)][M_pad][R2_16]: each column block's part of lora_act2
  float* lora_act2;         // [M_pad][R2_16] = h . lora_down2^T
  void* hidden_out;         // nullptr, or (tests) h [M, N1] in T
};

// Two launches on `stream`: the fused GEMM, then the fixed-order sum of lora_partial (when R2 > 0).
// INT4 paths only (cudaErrorInvalidValue for the NVFP4 one).
cudaError_t launch_w4a4_mlp_fc1(const MlpFc1Args& args, bool is_bf16, MmaPath path, cudaStream_t stream);

}  // namespace svdq
