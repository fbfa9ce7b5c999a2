// Plain-pointer interface between the torch bindings (w4a4_ops.cpp) and the kernels
// (w4a4_int8.cu). See w4a4_int8.cu for the layouts every pointer refers to.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace svdq {

constexpr int kGroup = 64;        // INT4 group size along K
constexpr int kGemmBlockM = 128;  // GEMM block tile; M_pad and N_pad are multiples of these
constexpr int kGemmBlockN = 128;

struct QuantizeArgs {
  const void* x;            // [M, K] bf16/fp16, row stride ldx elements (ldx % 4 == 0)
  int64_t ldx;
  const float* smooth;      // [K]
  const float* lora_down;   // [R, K]
  int M, K, M_pad, R, R16;
  void* act_packed;         // uint4 [M_pad/16][K/64][32]
  float* act_scales;        // [K/64][M_pad]
  float* lora_act;          // [M_pad][R16]
};

struct GemmArgs {
  const void* act_packed;   // as written by the quantize kernel
  const float* act_scales;
  const float* lora_act;
  const void* wgt_packed;   // uint4 [N_pad/16][K/64][32]
  const float* wgt_scales;  // [K/64][N_pad]
  const float* lora_up;     // [N_pad][R16]
  const float* bias;        // [N_pad] (zeros where the layer has none)
  void* out;                // [M, N] bf16/fp16, contiguous
  int M, N, M_pad, N_pad, G, R16;
};

cudaError_t launch_quantize_act_lora_down(const QuantizeArgs& args, bool input_is_bf16, bool act_unsigned,
                                          cudaStream_t stream);
cudaError_t launch_w4a4_gemm(const GemmArgs& args, bool output_is_bf16, bool act_unsigned, cudaStream_t stream);

}  // namespace svdq
