// Plain-pointer interface of the W4A16 GEMV/GEMM (w4a16_gemv.cu); layouts documented there.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace svdq {

constexpr int kW4A16Group = 64;    // weight group size along K (scale + zero per group)
constexpr int kW4A16BlockN = 32;   // output features per block; N_pad is a multiple of this
constexpr int kW4A16BlockM = 8;    // batch rows per block (the n8 side of the MMA)
constexpr int kW4A16MaxM = 65535 * kW4A16BlockM;  // grid.y limit

struct W4A16Args {
  const void* wgt_packed;   // uint4 [N_pad/16][K/64][32]
  const void* scale_zero;   // uint2 [N_pad/16][K/64][8]: 16-bit (scale, zero) of rows gid and gid+8
  const float* bias;        // [N_pad] (zeros where the layer has none)
  const void* x;            // [M, K] bf16/fp16, row stride ldx elements (ldx % 8 == 0, 16-byte aligned)
  int64_t ldx;
  void* out;                // [M, N] in x's dtype, contiguous
  int M, N, N_pad, G;
};

cudaError_t launch_w4a16_gemv(const W4A16Args& args, bool input_is_bf16, bool scales_are_bf16, cudaStream_t stream);

}  // namespace svdq
