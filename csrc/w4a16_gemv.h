// Plain-pointer interface of the W4A16 GEMV/GEMM (w4a16_gemv.cu); layouts documented there.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace svdq {

constexpr int kW4A16Group = 64;    // weight group size along K (scale + zero per group)
constexpr int kW4A16BlockN = 32;   // output features per block (the last block's tail is guarded)
constexpr int kW4A16BlockM = 8;    // batch rows per block (the n8 side of the MMA)
constexpr int kW4A16MaxM = 0x7FFFFFF8;                // rows are int; grid.x = ceil(M / 8) chunks
constexpr int kW4A16MaxN = 65535 * kW4A16BlockN;      // grid.y limit

// Every weight operand is a layer buffer in the FILE layout (docs/format.md), read in place:
struct W4A16Args {
  const uint8_t* qweight;   // [N, K/2] row-major, unsigned codes 0..15, low nibble = even k; 8-byte aligned
  const void* wscales;      // [K/64, N] 16-bit (bf16 or fp16), contiguous
  const void* wzeros;       // [K/64, N] same dtype as wscales, contiguous
  const void* bias;         // [N] same dtype as wscales, or nullptr (no bias)
  const void* x;            // [M, K] bf16/fp16, row stride ldx elements (ldx % 8 == 0, 16-byte aligned)
  int64_t ldx;
  void* out;                // [M, N] in x's dtype, contiguous
  int M, N, G;              // G = K / 64
};

cudaError_t launch_w4a16_gemv(const W4A16Args& args, bool input_is_bf16, bool scales_are_bf16, cudaStream_t stream);

}  // namespace svdq
