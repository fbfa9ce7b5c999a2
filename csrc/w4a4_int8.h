// Plain-pointer interface between the torch bindings (w4a4_ops.cpp) and the kernels
// (w4a4_int8.cu). See w4a4_int8.cu for the layouts every pointer refers to.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace svdq {

constexpr int kGroup = 64;        // INT4 group size along K
constexpr int kGemmBlockM = 128;  // GEMM block tile; M_pad and N_pad are multiples of these
constexpr int kGemmBlockN = 128;

// Which integer MMA the GEMM multiplies with; also fixes the packed layout of the codes (kernel A's
// output and the repacked weights). The bindings (w4a4_ops.cpp) name them by their instruction.
enum class MmaPath : int {
  kS8m16n8k32 = 0,  // nibbles expanded to int8, interleaved layout: sm_90, sm_120 (s4 is emulated there)
  kS4m16n8k64 = 1,  // native s4, native layout: sm_80, sm_86, sm_89
  kS4m8n8k32 = 2,   // native s4, native layout: sm_75
  kE2M1S8m16n8k16 = 3,  // NVFP4 files: E2M1 codes x 2 decoded to int8, one k16 MMA per 16-group: sm_80+
  kE2M1BlockScaledM16n8k64 = 4,  // NVFP4 files: the block-scaled FP4 MMA, native layout: sm_120 (sm_120a)
};

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
  float alpha = 1.f;        // NVFP4: wtscale / 4, applied to the quantized branch's fp32 sum,
  const float* channel_scale = nullptr;  // NVFP4: then times wcscales, fp32 [N_pad]
};

cudaError_t launch_quantize_act_lora_down(const QuantizeArgs& args, bool input_is_bf16, bool act_unsigned,
                                          MmaPath path, cudaStream_t stream);
cudaError_t launch_w4a4_gemm(const GemmArgs& args, bool output_is_bf16, bool act_unsigned, MmaPath path,
                             cudaStream_t stream);
// The largest rank the quantize kernel takes on `device` (its fp32 accumulator, 64 B per rank, shares
// the block's opt-in shared memory with a 16.6 KB staging buffer): 764 on sm_75, 1324 on sm_86/89/120.
cudaError_t quantize_max_rank(int device, int* max_rank);

}  // namespace svdq
