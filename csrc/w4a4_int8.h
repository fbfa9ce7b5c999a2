// Plain-pointer interface between the torch bindings (w4a4_ops.cpp) and the kernels
// (w4a4_int8.cu). See w4a4_int8.cu for the layouts every pointer refers to.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace svdq {

constexpr int kGroup = 64;        // INT4 group size along K; the kernels' K step
constexpr int kGemmBlockM = 128;  // GEMM block tile; M_pad is a multiple of kGemmBlockM
constexpr int kGemmBlockN = 128;

// Which integer MMA the GEMM multiplies with; also fixes which k of a 64-chunk each lane owns (kernel
// A and the GEMM must be given the same one). The bindings (w4a4_ops.cpp) name them by their instruction.
enum class MmaPath : int {
  kS8m16n8k32 = 0,  // nibbles expanded to int8: sm_90, sm_120 (s4 is emulated there)
  kS4m16n8k64 = 1,  // native s4: sm_80, sm_86, sm_89
  kS4m8n8k32 = 2,   // native s4: sm_75
  kE2M1S8m16n8k16 = 3,  // NVFP4 files: E2M1 codes x 2 decoded to int8, one k16 MMA per 16-group: sm_80+
  kE2M1BlockScaledM16n8k64 = 4,  // NVFP4 files: the block-scaled FP4 MMA: sm_120 (sm_120a)
};

// T below is the layer's 16-bit dtype (bf16 or fp16): x, the output and the layer's 16-bit tensors.
struct QuantizeArgs {
  const void* x;            // T [M, K], row stride ldx elements (ldx % 4 == 0)
  int64_t ldx;
  const void* smooth;       // T [K]
  const void* lora_down;    // T [R, K]
  int M, K, M_pad, R, R16;
  uint8_t* act_packed;      // codes [M_pad, K64/2], two per byte, low nibble = even k (K64 = K rounded up to 64)
  float* act_scales;        // [K64/group][M_pad]
  float* lora_act;          // [M_pad][R16]
  // Split-K workspace, sized by quantize_workspace: lora_act's partial sums (fp32, any contents), and one
  // int32 arrival counter per row block, which must be zero when the launch starts; the kernel leaves
  // them zero. nullptr where quantize_workspace asks for none.
  float* lora_partials;
  int* counters;
};

struct GemmArgs {
  const uint8_t* act_packed;  // as written by the quantize kernel
  const float* act_scales;
  const float* lora_act;
  const uint8_t* qweight;   // the layer's qweight: codes [N, K/2], two per byte, low nibble = even k
  const void* wscales;      // the layer's wscales [K/group][N]: T (INT4) or E4M3 bytes (NVFP4)
  const void* lora_up;      // T [N][R]
  const void* bias;         // T [N], or nullptr
  const float* wtscale;     // NVFP4: the per-tensor scale (one fp32 on the device); INT4: nullptr
  const float* wcscales;    // NVFP4: per-channel scales, fp32 [N]; INT4: nullptr
  void* out;                // T [M, N], contiguous
  int M, N, K, M_pad, G, R, R16;  // G = K64 / 64; N even
  // The sm_90a GEMM's split-K workspace, sized by sm90a_gemm_workspace (w4a4_sm90a.h): fp32 partial sums
  // (any contents) and int32 counters that are zero when the launch starts (it leaves them zero). nullptr
  // where none is needed; the other GEMMs ignore them.
  float* split_partials = nullptr;
  int* split_counters = nullptr;
};

cudaError_t launch_quantize_act_lora_down(const QuantizeArgs& args, bool input_is_bf16, bool act_unsigned,
                                          MmaPath path, cudaStream_t stream);
cudaError_t launch_w4a4_gemm(const GemmArgs& args, bool is_bf16, bool act_unsigned, MmaPath path,
                             cudaStream_t stream);
// The workspace the quantize kernel (kernel A) needs for these sizes (any rank, no limit): partial_floats
// fp32 values for lora_partials and `counters` int32 counters (zero-initialized once: every launch leaves
// them zero, so a buffer may serve all launches on one stream). 0 = none.
void quantize_workspace(int M_pad, int K, int R16, int64_t* partial_floats, int* counters);

}  // namespace svdq
