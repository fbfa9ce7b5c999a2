// Torch bindings for the W4A4 kernels: argument checks, allocation, stream, launch.
// The layouts are documented in w4a4_int8.cu: the kernels take the layer's tensors as the checkpoint
// stores them (docs/format.md), and activations in the same layout.
#include <torch/extension.h>
// c10 only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers a minimal toolkit lacks)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>

#include "w4a16_gemv.h"
#include "w4a4_int8.h"
#include "w4a4_mlp.h"
#include "w4a4_sm90a.h"

namespace {

// Error messages are put together here, without iostreams, and TORCH_CHECK gets one string. On the GPU
// machine (torch 2.11.0+cu130 from PyPI, this extension built there), inserting a NUMBER into a
// std::ostringstream from this extension - what TORCH_CHECK's c10::str does with its arguments -
// crashed the process (SIGSEGV in basic_ostream::_M_insert<long>, seen with cuda-gdb), while inserting
// strings works: a libstdc++ mix-up between the extension and torch whose root cause is not
// established. std::to_string does not touch the iostream locale.
std::string msg_part(const char* s) { return s; }
std::string msg_part(const std::string& s) { return s; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string msg_part(T v) { return std::to_string(v); }
std::string msg_part(at::ScalarType t) { return c10::toString(t); }
std::string msg_part(const at::Device& d) {
  return c10::DeviceTypeName(d.type(), /*lower_case=*/true) + (d.has_index() ? ":" + std::to_string(d.index()) : "");
}
std::string msg_part(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  ((s += msg_part(args)), ...);
  return s;
}
#define SVDQ_CHECK(cond, ...) TORCH_CHECK(cond, msg(__VA_ARGS__))


void check_cuda_error(cudaError_t e, const char* what) {
  SVDQ_CHECK(e == cudaSuccess, "svdq cuda: ", what, " failed: ", cudaGetErrorString(e),
              e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction
                  ? " (the extension was not built for this GPU's architecture: rebuild it, e.g. clear the "
                    "comfyui-svdquant kernel cache)"
                  : "");
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape,
                  const at::Device& dev) {
  SVDQ_CHECK(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
  SVDQ_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  SVDQ_CHECK(t.is_contiguous(), name, " must be contiguous");
  SVDQ_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
  // The kernels read up to 16 bytes at a time; fresh allocations are 256-byte aligned, views may not be.
  SVDQ_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void check_f32(const at::Tensor& t, const char* name, std::vector<int64_t> shape, const at::Device& dev) {
  check_tensor(t, name, at::kFloat, std::move(shape), dev);
}

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The bindings name the GEMM's MMA flavour by its instruction (nunchaku_ext/backends/cuda.py picks one
// per GPU); it also fixes the packed layout, so kernel A and the GEMM must be given the same one.
svdq::MmaPath parse_mma_path(const std::string& name) {
  if (name == "s8_m16n8k32") return svdq::MmaPath::kS8m16n8k32;
  if (name == "s4_m16n8k64") return svdq::MmaPath::kS4m16n8k64;
  if (name == "s4_m8n8k32") return svdq::MmaPath::kS4m8n8k32;
  if (name == "e2m1_s8_m16n8k16") return svdq::MmaPath::kE2M1S8m16n8k16;
  if (name == "e2m1_bs_m16n8k64") return svdq::MmaPath::kE2M1BlockScaledM16n8k64;
  SVDQ_CHECK(false, "unknown mma_path '", name,
              "' (expected s8_m16n8k32, s4_m16n8k64, s4_m8n8k32, e2m1_s8_m16n8k16 or e2m1_bs_m16n8k64)");
}

bool is_nvfp4_path(svdq::MmaPath path) {
  return path == svdq::MmaPath::kE2M1S8m16n8k16 || path == svdq::MmaPath::kE2M1BlockScaledM16n8k64;
}

// Scale groups per 64 columns of K: the NVFP4 path (E2M1 codes) has 16-wide groups, INT4 64-wide.
// NVFP4 K need only be a multiple of 16; the packed codes and scales are zero-padded to K64 = K
// rounded up to 64. E2M1 codes are signed: there is no unsigned-input NVFP4 kernel.
int64_t scale_groups_per_64(svdq::MmaPath path, bool act_unsigned) {
  if (!is_nvfp4_path(path)) return 1;
  SVDQ_CHECK(!act_unsigned, "NVFP4 (E2M1) activations are signed; act_unsigned is for INT4 layers only");
  return 4;
}

// Kernel A's inputs and outputs, shared by its two code layouts (quantize_act_lora_down, quantize_act_sm90a):
// x [M, K] bf16/fp16 (row stride multiple of 4, unit column stride), smooth [K] and lora_down [R, K] in x's
// dtype; K a positive multiple of k_step. Outputs: act uint8 [M_pad, act_row_bytes], act_scales fp32
// [scale_rows, M_pad], lora_act fp32 [M_pad, R16] (M_pad = M rounded up to the GEMM block tile), or the
// given ones (tests pass NaN/garbage-filled ones so that an element the kernel fails to write cannot pass
// by reusing memory that happened to hold the right value). launch(args, stream) starts the kernel.
struct KernelAShape {
  int64_t M, K, M_pad, R, R16;
};

KernelAShape check_kernel_a_inputs(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                                   int64_t k_step) {
  SVDQ_CHECK(x.is_cuda() && x.dim() == 2, "x must be a 2-D CUDA tensor");
  SVDQ_CHECK(is_16bit(x.scalar_type()), "x must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), R = lora_down.size(0);
  SVDQ_CHECK(K % k_step == 0 && K > 0, "in_features ", K, " is not a positive multiple of ", k_step);
  SVDQ_CHECK(x.stride(1) == 1 && x.stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 8 == 0,
             "x needs unit column stride, a row stride divisible by 4 and 8-byte alignment");
  SVDQ_CHECK(M > 0 && M < (int64_t(1) << 31) - svdq::kGemmBlockM, "bad number of rows ", M);
  check_tensor(smooth, "smooth", x.scalar_type(), {K}, x.device());
  check_tensor(lora_down, "lora_down", x.scalar_type(), {R, K}, x.device());
  SVDQ_CHECK(R < (int64_t(1) << 24), "rank ", R, " is too large");
  return {M, K, round_up(M, svdq::kGemmBlockM), R, round_up(R, 16)};
}

// Split-K counters of kernel A (w4a4_int8.cu: one int32 per row block) and of the sm_90a GEMM (w4a4_sm90a.cu:
// two per tile), zero when a launch starts, and every launch leaves them zero (the block or CTA that
// finishes a row block or tile resets its own). So one zero-filled buffer per device and stream serves
// every launch: launches on one stream run one after the other, launches on different streams never share a
// buffer. A launch that needs more counters gets a new,
// larger zero-filled buffer (allocated on that stream, so ordered before it). A few KB each, kept for the
// life of the process (the map is never destroyed, so no CUDA memory is freed during exit).
int* split_k_counters(const at::Device& dev, cudaStream_t stream, int64_t count) {
  static std::mutex mutex;
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counters = (*buffers)[{dev.index(), stream}];
  if (!counters.defined() || counters.numel() < count)
    counters = at::zeros({std::max<int64_t>(count, 4096)}, at::TensorOptions().dtype(at::kInt).device(dev));
  return counters.data_ptr<int>();
}

template <typename Launch>
std::vector<at::Tensor> run_kernel_a(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                                     const KernelAShape& d, int64_t act_row_bytes, int64_t scale_rows,
                                     c10::optional<at::Tensor> act_out, c10::optional<at::Tensor> act_scales_out,
                                     c10::optional<at::Tensor> lora_act_out, Launch&& launch) {
  SVDQ_CHECK(d.M_pad * act_row_bytes < (int64_t(1) << 31), "activations too large");
  const at::Device dev = x.device();
  const c10::cuda::CUDAGuard guard(dev);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor act = act_out ? *act_out : at::empty({d.M_pad, act_row_bytes}, x.options().dtype(at::kByte));
  at::Tensor act_scales = act_scales_out ? *act_scales_out : at::empty({scale_rows, d.M_pad}, f32);
  at::Tensor lora_act = lora_act_out ? *lora_act_out : at::empty({d.M_pad, d.R16}, f32);
  check_tensor(act, "act_out", at::kByte, {d.M_pad, act_row_bytes}, dev);
  check_f32(act_scales, "act_scales_out", {scale_rows, d.M_pad}, dev);
  check_f32(lora_act, "lora_act_out", {d.M_pad, d.R16}, dev);

  svdq::QuantizeArgs a;
  a.x = x.data_ptr();
  a.ldx = x.stride(0);
  a.smooth = smooth.data_ptr();
  a.lora_down = lora_down.data_ptr();
  a.M = static_cast<int>(d.M);
  a.K = static_cast<int>(d.K);
  a.M_pad = static_cast<int>(d.M_pad);
  a.R = static_cast<int>(d.R);
  a.R16 = static_cast<int>(d.R16);
  a.act_packed = act.data_ptr<uint8_t>();
  a.act_scales = act_scales.data_ptr<float>();
  a.lora_act = lora_act.data_ptr<float>();
  // The split-K workspace: partial sums from the caching allocator (stream-ordered, any contents), counters.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t partial_floats = 0;
  int counters = 0;
  svdq::quantize_workspace(a.M_pad, a.K, a.R16, &partial_floats, &counters);
  at::Tensor partials = partial_floats > 0 ? at::empty({partial_floats}, f32) : at::Tensor();
  a.lora_partials = partials.defined() ? partials.data_ptr<float>() : nullptr;
  a.counters = counters > 0 ? split_k_counters(dev, stream, counters) : nullptr;
  check_cuda_error(launch(a, stream), "quantize kernel (kernel A)");
  return {act, act_scales, lora_act};
}

// Kernel A of the mma.sync paths: act_packed uint8 [M_pad, K64/2] (K64 = K rounded up to 64; codes as the
// file stores weights), act_scales fp32 [K64/group, M_pad], lora_act fp32 [M_pad, R16].
std::vector<at::Tensor> quantize_act_lora_down(const at::Tensor& x, const at::Tensor& smooth,
                                               const at::Tensor& lora_down, bool act_unsigned,
                                               const std::string& mma_path,
                                               c10::optional<at::Tensor> act_packed_out,
                                               c10::optional<at::Tensor> act_scales_out,
                                               c10::optional<at::Tensor> lora_act_out) {
  const svdq::MmaPath path = parse_mma_path(mma_path);
  const int64_t scale_groups = scale_groups_per_64(path, act_unsigned);
  const KernelAShape d = check_kernel_a_inputs(x, smooth, lora_down, svdq::kGroup / scale_groups);
  const int64_t G = round_up(d.K, svdq::kGroup) / svdq::kGroup;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  return run_kernel_a(x, smooth, lora_down, d, G * (svdq::kGroup / 2), G * scale_groups, act_packed_out,
                      act_scales_out, lora_act_out, [&](const svdq::QuantizeArgs& a, cudaStream_t stream) {
                        return svdq::launch_quantize_act_lora_down(a, bf16, act_unsigned, path, stream);
                      });
}

// How kernel A stored the activation codes the GEMM takes: packed two per byte (quantize_act_lora_down),
// or one E4M3 byte each (quantize_act_sm90a, the wgmma path).
enum class ActCodes { kPacked, kE4M3Bytes };

// The GEMM's operand checks, shared by w4a4_gemm, w4a4_mlp_fc1 and w4a4_gemm_sm90a: act_* as kernel A
// returns them; the layer's tensors as the checkpoint stores them (T = lora_up's dtype, bf16/fp16):
// qweight uint8 [N, K/2], wscales [K/group, N] (T for INT4, float8_e4m3fn for NVFP4: scale_groups 4 per
// 64 k), lora_up T [N, R], bias T [N] or none; NVFP4 only: wtscale fp32 [] and wcscales fp32 [N].
// N must be even. The output pointer is left to the caller.
svdq::GemmArgs checked_gemm_args(const at::Tensor& act_packed, const at::Tensor& act_scales, const at::Tensor& lora_act,
                                 const at::Tensor& qweight, const at::Tensor& wscales, const at::Tensor& lora_up,
                                 const c10::optional<at::Tensor>& bias, int64_t M, int64_t scale_groups, ActCodes codes,
                                 const c10::optional<at::Tensor>& wtscale, const c10::optional<at::Tensor>& wcscales) {
  const int64_t group = svdq::kGroup / scale_groups;
  SVDQ_CHECK(act_packed.is_cuda() && act_packed.dim() == 2 && act_packed.scalar_type() == at::kByte,
             "the activation codes must be the uint8 CUDA tensor made by kernel A");
  const at::Device dev = act_packed.device();
  SVDQ_CHECK(qweight.dim() == 2 && lora_up.dim() == 2, "qweight and lora_up must be 2-D");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, R = lora_up.size(1);
  const int64_t M_pad = act_packed.size(0), G = round_up(K, svdq::kGroup) / svdq::kGroup, R16 = lora_act.size(1);
  const at::ScalarType T = lora_up.scalar_type();
  SVDQ_CHECK(is_16bit(T), "lora_up must be bfloat16 or float16 (the layer's dtype), got ", T);
  SVDQ_CHECK(K > 0 && K % group == 0, "in_features ", K, " is not a positive multiple of ", group);
  SVDQ_CHECK(N > 0 && N % 2 == 0, "out_features ", N, " must be even for the cuda kernels");
  SVDQ_CHECK(N * (K / 2) < (int64_t(1) << 31), "weight too large");
  SVDQ_CHECK(M_pad % svdq::kGemmBlockM == 0 && M <= M_pad && M > M_pad - svdq::kGemmBlockM, "M ", M,
              " does not match the packed activations");
  SVDQ_CHECK(R16 == round_up(R, 16), "lora_act has ", R16, " rank columns, lora_up's rank ", R, " needs ", round_up(R, 16));
  check_tensor(act_packed, "act_packed", at::kByte,
               {M_pad, codes == ActCodes::kPacked ? G * (svdq::kGroup / 2) : K}, dev);
  check_f32(act_scales, "act_scales", {G * scale_groups, M_pad}, dev);
  check_f32(lora_act, "lora_act", {M_pad, R16}, dev);
  check_tensor(qweight, "qweight", at::kByte, {N, K / 2}, dev);
  check_tensor(wscales, "wscales", scale_groups > 1 ? at::kFloat8_e4m3fn : T, {K / group, N}, dev);
  check_tensor(lora_up, "lora_up", T, {N, R}, dev);
  if (bias) check_tensor(*bias, "bias", T, {N}, dev);
  SVDQ_CHECK((scale_groups > 1) == (wtscale.has_value() && wcscales.has_value()),
              "wtscale and wcscales are given for NVFP4 layers, and only for them");
  if (wtscale) check_f32(*wtscale, "wtscale", {}, dev);
  if (wcscales) check_f32(*wcscales, "wcscales", {N}, dev);
  SVDQ_CHECK(M_pad / svdq::kGemmBlockM < 65536, "problem too large");

  svdq::GemmArgs a;
  a.act_packed = act_packed.data_ptr<uint8_t>();
  a.act_scales = act_scales.data_ptr<float>();
  a.lora_act = lora_act.data_ptr<float>();
  a.qweight = qweight.data_ptr<uint8_t>();
  a.wscales = wscales.data_ptr();
  a.lora_up = lora_up.data_ptr();
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.wtscale = wtscale ? wtscale->data_ptr<float>() : nullptr;
  a.wcscales = wcscales ? wcscales->data_ptr<float>() : nullptr;
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.M_pad = static_cast<int>(M_pad);
  a.G = static_cast<int>(G);
  a.R = static_cast<int>(R);
  a.R16 = static_cast<int>(R16);
  return a;
}

// The GEMM: y [M, N] in the layer's dtype. Operands as checked_gemm_args takes them.
at::Tensor w4a4_gemm(const at::Tensor& act_packed, const at::Tensor& act_scales, const at::Tensor& lora_act,
                     const at::Tensor& qweight, const at::Tensor& wscales, const at::Tensor& lora_up,
                     c10::optional<at::Tensor> bias, int64_t M, bool act_unsigned, const std::string& mma_path,
                     c10::optional<at::Tensor> out_opt, c10::optional<at::Tensor> wtscale,
                     c10::optional<at::Tensor> wcscales) {
  const svdq::MmaPath path = parse_mma_path(mma_path);
  svdq::GemmArgs a = checked_gemm_args(act_packed, act_scales, lora_act, qweight, wscales, lora_up, bias, M,
                                       scale_groups_per_64(path, act_unsigned), ActCodes::kPacked, wtscale, wcscales);
  const at::Device dev = act_packed.device();
  const at::ScalarType T = lora_up.scalar_type();
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = out_opt ? *out_opt : at::empty({M, a.N}, lora_up.options());
  SVDQ_CHECK(out.device() == dev && out.scalar_type() == T && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({M, static_cast<int64_t>(a.N)}) &&
                  reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0,
              "out must be a contiguous, 4-byte aligned [M, N] tensor of the layer's dtype");
  a.out = out.data_ptr();
  check_cuda_error(svdq::launch_w4a4_gemm(a, T == at::kBFloat16, act_unsigned, path,
                                          c10::cuda::getCurrentCUDAStream().stream()),
                   "w4a4_gemm kernel");
  return out;
}

// The MLP's fc1 with GELU and fc2's input quantization fused (w4a4_mlp.cuh). fc1's operands as for
// w4a4_gemm (signed INT4 input; N1 = its out_features = fc2's in_features, a multiple of 64); h is
// rounded to fc1's dtype T; smooth2 T [N1] and lora_down2 T [R2, N1] are fc2's.
// Returns fc2's GEMM input as quantize_act_lora_down would make it from h: (act_packed uint8
// [M_pad, N1/2], act_scales fp32 [N1/64, M_pad], lora_act fp32 [M_pad, R2_16]).
// Optional outputs as for quantize_act_lora_down; hidden_out (tests): h [M, N1] in T.
std::vector<at::Tensor> w4a4_mlp_fc1(const at::Tensor& act_packed, const at::Tensor& act_scales,
                                     const at::Tensor& lora_act, const at::Tensor& qweight,
                                     const at::Tensor& wscales, const at::Tensor& lora_up,
                                     c10::optional<at::Tensor> bias, int64_t M, const std::string& mma_path,
                                     const at::Tensor& smooth2, const at::Tensor& lora_down2,
                                     c10::optional<at::Tensor> act2_packed_out, c10::optional<at::Tensor> act2_scales_out,
                                     c10::optional<at::Tensor> lora_act2_out, c10::optional<at::Tensor> hidden_out) {
  const svdq::MmaPath path = parse_mma_path(mma_path);
  SVDQ_CHECK(!is_nvfp4_path(path), "the fused MLP is for INT4 layers only");
  svdq::MlpFc1Args a;
  a.fc1 = checked_gemm_args(act_packed, act_scales, lora_act, qweight, wscales, lora_up, bias, M, 1,
                            ActCodes::kPacked, c10::nullopt, c10::nullopt);
  const int64_t N1 = a.fc1.N;
  SVDQ_CHECK(N1 % svdq::kGroup == 0, "the hidden width ", N1, " is not a multiple of 64");
  const at::Device dev = act_packed.device();
  const at::ScalarType T = lora_up.scalar_type();
  const int64_t M_pad = a.fc1.M_pad, G2 = N1 / svdq::kGroup, R2 = lora_down2.size(0);
  const int64_t R2_16 = round_up(R2, 16), col_blocks = round_up(N1, svdq::kGemmBlockN) / svdq::kGemmBlockN;
  check_tensor(smooth2, "smooth2", T, {N1}, dev);
  check_tensor(lora_down2, "lora_down2", T, {R2, N1}, dev);

  const c10::cuda::CUDAGuard guard(dev);
  auto f32 = act_scales.options();
  at::Tensor act2 = act2_packed_out ? *act2_packed_out : at::empty({M_pad, N1 / 2}, act_packed.options());
  at::Tensor scales2 = act2_scales_out ? *act2_scales_out : at::empty({G2, M_pad}, f32);
  at::Tensor lora_act2 = lora_act2_out ? *lora_act2_out : at::empty({M_pad, R2_16}, f32);
  check_tensor(act2, "act2_packed_out", at::kByte, {M_pad, N1 / 2}, dev);
  check_f32(scales2, "act2_scales_out", {G2, M_pad}, dev);
  check_f32(lora_act2, "lora_act2_out", {M_pad, R2_16}, dev);
  if (hidden_out) check_tensor(*hidden_out, "hidden_out", T, {M, N1}, dev);
  // Each column block's part of lora_act2, summed in order by a second launch (deterministic).
  at::Tensor partial = at::empty({R2 ? col_blocks : 0, M_pad, R2_16}, f32);
  a.smooth2 = smooth2.data_ptr();
  a.lora_down2 = lora_down2.data_ptr();
  a.R2 = static_cast<int>(R2);
  a.R2_16 = static_cast<int>(R2_16);
  a.act2_packed = act2.data_ptr<uint8_t>();
  a.act2_scales = scales2.data_ptr<float>();
  a.lora_partial = partial.data_ptr<float>();
  a.lora_act2 = lora_act2.data_ptr<float>();
  a.hidden_out = hidden_out ? hidden_out->data_ptr() : nullptr;
  check_cuda_error(svdq::launch_w4a4_mlp_fc1(a, T == at::kBFloat16, path, c10::cuda::getCurrentCUDAStream().stream()),
                   "w4a4_mlp_fc1 kernel");
  return {act2, scales2, lora_act2};
}

// W4A16 (modulation linears), reading the layer's buffers in place, in the file layout (layouts:
// w4a16_gemv.cu): x [M, K] bf16/fp16 (unit column stride, row stride multiple of 8, 16-byte aligned);
// qweight uint8 [N, K/2] contiguous, 8-byte aligned; wscales and wzeros [K/64, N] contiguous, both
// bfloat16 or both float16; bias [N] of their dtype, or None. Returns y [M, N] in x's dtype.
at::Tensor w4a16_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& wscales,
                      const at::Tensor& wzeros, c10::optional<at::Tensor> bias_opt, c10::optional<at::Tensor> out_opt) {
  SVDQ_CHECK(x.is_cuda() && x.dim() == 2, "x must be a 2-D CUDA tensor");
  SVDQ_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be bfloat16 or float16, got ", x.scalar_type());
  const at::Device dev = x.device();
  const int64_t M = x.size(0), K = x.size(1);
  SVDQ_CHECK(K % svdq::kW4A16Group == 0 && K > 0 && K <= (int64_t(1) << 26), "in_features ", K,
              " is not a positive multiple of 64 (at most 2^26)");
  SVDQ_CHECK(x.stride(1) == 1 && x.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "x needs unit column stride, a row stride divisible by 8 and 16-byte alignment");
  SVDQ_CHECK(M > 0 && M <= svdq::kW4A16MaxM, "W4A16 takes 1 to ", svdq::kW4A16MaxM, " rows, got ", M);
  SVDQ_CHECK(qweight.device() == dev && qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                  qweight.size(1) == K / 2 && qweight.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 8 == 0,
              "qweight must be a contiguous, 8-byte aligned uint8 [N, K/2] tensor on ", dev, ", got ",
              qweight.scalar_type(), " ", qweight.sizes(), " on ", qweight.device());
  const int64_t N = qweight.size(0), G = K / svdq::kW4A16Group;
  SVDQ_CHECK(N > 0 && N <= svdq::kW4A16MaxN, "W4A16 takes 1 to ", svdq::kW4A16MaxN, " output features, got ", N);
  const at::ScalarType scale_dtype = wscales.scalar_type();
  SVDQ_CHECK(scale_dtype == at::kBFloat16 || scale_dtype == at::kHalf, "wscales must be bfloat16 or float16, got ",
              scale_dtype);
  for (const at::Tensor* t : {&wscales, &wzeros})
    SVDQ_CHECK(t->device() == dev && t->scalar_type() == scale_dtype && t->is_contiguous() &&
                    t->sizes() == at::IntArrayRef({G, N}),
                "wscales and wzeros must be contiguous [K/64, N] tensors of one dtype on ", dev, ", got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  const at::Tensor* bias = bias_opt && bias_opt->defined() ? &*bias_opt : nullptr;
  if (bias)
    SVDQ_CHECK(bias->device() == dev && bias->scalar_type() == scale_dtype && bias->is_contiguous() &&
                    bias->sizes() == at::IntArrayRef({N}),
                "bias must be a contiguous [N] tensor of the scales' dtype on ", dev, ", got ", bias->scalar_type(),
                " ", bias->sizes(), " on ", bias->device());

  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = out_opt ? *out_opt : at::empty({M, N}, x.options());
  SVDQ_CHECK(out.device() == dev && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({M, N}),
              "out must be a contiguous [M, N] tensor of x's dtype");
  svdq::W4A16Args a;
  a.qweight = qweight.data_ptr<uint8_t>();
  a.wscales = wscales.data_ptr();
  a.wzeros = wzeros.data_ptr();
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.x = x.data_ptr();
  a.ldx = x.stride(0);
  a.out = out.data_ptr();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.G = static_cast<int>(G);
  check_cuda_error(svdq::launch_w4a16_gemv(a, x.scalar_type() == at::kBFloat16, scale_dtype == at::kBFloat16,
                                           c10::cuda::getCurrentCUDAStream().stream()),
                   "w4a16_gemv kernel");
  return out;
}

// ------------------------------------------------------------------------------------------------
// The sm_90a wgmma path (csrc/w4a4_sm90a.cu): INT4 layers with N % 64 == 0 and K % 128 == 0 on an sm_90
// GPU (nunchaku_ext/backends/cuda.py decides; the other shapes take the mma.sync path).

void check_sm90(const at::Device& dev) {
  int major = 0, minor = 0;
  check_cuda_error(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev.index()), "device query");
  check_cuda_error(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev.index()), "device query");
  SVDQ_CHECK(major == 9 && minor == 0, "the wgmma path (e4m3_wgmma_sm90a) runs on sm_90 GPUs only; ", dev, " is sm_",
              major, minor);
}

// Kernel A for the wgmma path: as quantize_act_lora_down, but returns act uint8 [M_pad, K] (one E4M3 code
// byte per value, k permuted in each 64-group) and act_scales fp32 [K/64, M_pad] (tokens permuted in each
// 16-block); lora_act fp32 [M_pad, R16] as there. K % 128 == 0.
std::vector<at::Tensor> quantize_act_sm90a(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                                           bool act_unsigned, c10::optional<at::Tensor> act_out,
                                           c10::optional<at::Tensor> act_scales_out,
                                           c10::optional<at::Tensor> lora_act_out) {
  const KernelAShape d = check_kernel_a_inputs(x, smooth, lora_down, svdq::kSm90aBlockK);
  check_sm90(x.device());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  return run_kernel_a(x, smooth, lora_down, d, d.K, d.K / svdq::kGroup, act_out, act_scales_out, lora_act_out,
                      [&](const svdq::QuantizeArgs& a, cudaStream_t stream) {
                        return svdq::launch_quantize_act_e4m3(a, bf16, act_unsigned, stream);
                      });
}

// The wgmma GEMM with the fused epilogue: y [M, N] in the layer's dtype T. act / act_scales / lora_act as
// quantize_act_sm90a returns them; the layer's tensors as for w4a4_gemm (INT4): qweight uint8 [N, K/2],
// wscales T [K/64, N], lora_up T [N, R], bias T [N] or none. N % 64 == 0, K % 128 == 0.
at::Tensor w4a4_gemm_sm90a(const at::Tensor& act, const at::Tensor& act_scales, const at::Tensor& lora_act,
                           const at::Tensor& qweight, const at::Tensor& wscales, const at::Tensor& lora_up,
                           c10::optional<at::Tensor> bias, int64_t M, c10::optional<at::Tensor> out_opt) {
  svdq::GemmArgs a = checked_gemm_args(act, act_scales, lora_act, qweight, wscales, lora_up, bias, M, 1,
                                       ActCodes::kE4M3Bytes, c10::nullopt, c10::nullopt);
  const at::Device dev = act.device();
  check_sm90(dev);
  SVDQ_CHECK(a.N % svdq::kSm90aNMultiple == 0 && a.K % svdq::kSm90aBlockK == 0, "the wgmma path takes N % ",
             svdq::kSm90aNMultiple, " == 0 and K % ", svdq::kSm90aBlockK, " == 0, got N = ", a.N, ", K = ", a.K);
  const at::ScalarType T = lora_up.scalar_type();
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = out_opt ? *out_opt : at::empty({M, static_cast<int64_t>(a.N)}, lora_up.options());
  SVDQ_CHECK(out.device() == dev && out.scalar_type() == T && out.is_contiguous() &&
                 out.sizes() == at::IntArrayRef({M, static_cast<int64_t>(a.N)}) &&
                 reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
             "out must be a contiguous, 16-byte aligned [M, N] tensor of the layer's dtype");
  a.out = out.data_ptr();
  // The split-K workspace (small M, long K): partial sums from the caching allocator, counters as kernel A's.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t partial_floats = 0;
  int counters = 0;
  check_cuda_error(svdq::sm90a_gemm_workspace(a.M, a.N, a.K, &partial_floats, &counters), "device query");
  at::Tensor partials = partial_floats > 0 ? at::empty({partial_floats}, lora_up.options().dtype(at::kFloat)) : at::Tensor();
  a.split_partials = partials.defined() ? partials.data_ptr<float>() : nullptr;
  a.split_counters = counters > 0 ? split_k_counters(dev, stream, counters) : nullptr;
  check_cuda_error(svdq::launch_w4a4_gemm_sm90a(a, T == at::kBFloat16, stream), "w4a4_gemm_sm90a kernel");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ComfyUI-SVDQuant CUDA kernels (W4A4 INT4 on INT8 or native INT4 tensor cores)";
  m.def("quantize_act_lora_down", &quantize_act_lora_down, "activation quantize + low-rank down (kernel A)",
        py::arg("x"), py::arg("smooth"), py::arg("lora_down"), py::arg("act_unsigned"), py::arg("mma_path"),
        py::arg("act_packed_out") = py::none(), py::arg("act_scales_out") = py::none(),
        py::arg("lora_act_out") = py::none());
  m.def("w4a4_gemm", &w4a4_gemm, "W4A4 GEMM with fused epilogue (kernel B)", py::arg("act_packed"),
        py::arg("act_scales"), py::arg("lora_act"), py::arg("qweight"), py::arg("wscales"), py::arg("lora_up"),
        py::arg("bias"), py::arg("M"), py::arg("act_unsigned"), py::arg("mma_path"), py::arg("out") = py::none(),
        py::arg("wtscale") = py::none(), py::arg("wcscales") = py::none());
  m.def("w4a4_mlp_fc1", &w4a4_mlp_fc1, "MLP fc1 GEMM + GELU(tanh) + fc2 input quantization (kernel B, MLP variant)",
        py::arg("act_packed"), py::arg("act_scales"), py::arg("lora_act"), py::arg("qweight"), py::arg("wscales"),
        py::arg("lora_up"), py::arg("bias"), py::arg("M"), py::arg("mma_path"), py::arg("smooth2"),
        py::arg("lora_down2"), py::arg("act2_packed_out") = py::none(), py::arg("act2_scales_out") = py::none(),
        py::arg("lora_act2_out") = py::none(), py::arg("hidden_out") = py::none());
  m.def("quantize_act_sm90a", &quantize_act_sm90a, "kernel A for the sm_90a wgmma path (E4M3 code bytes)",
        py::arg("x"), py::arg("smooth"), py::arg("lora_down"), py::arg("act_unsigned"), py::arg("act_out") = py::none(),
        py::arg("act_scales_out") = py::none(), py::arg("lora_act_out") = py::none());
  m.def("w4a4_gemm_sm90a", &w4a4_gemm_sm90a, "W4A4 GEMM on sm_90a wgmma (E4M3) with fused epilogue", py::arg("act"),
        py::arg("act_scales"), py::arg("lora_act"), py::arg("qweight"), py::arg("wscales"), py::arg("lora_up"),
        py::arg("bias"), py::arg("M"), py::arg("out") = py::none());
  m.attr("SM90A_N_MULTIPLE") = svdq::kSm90aNMultiple;
  m.attr("SM90A_BLOCK_K") = svdq::kSm90aBlockK;
  m.attr("GEMM_BLOCK_M") = svdq::kGemmBlockM;
  m.attr("GROUP") = svdq::kGroup;
  m.def("w4a16_gemv", &w4a16_gemv,
        "W4A16 linear (modulation layers): 16-bit tensor cores on the 4-bit codes of the file layout, read in place",
        py::arg("x"), py::arg("qweight"), py::arg("wscales"), py::arg("wzeros"), py::arg("bias") = py::none(),
        py::arg("out") = py::none());
  m.attr("W4A16_BLOCK_N") = svdq::kW4A16BlockN;
}
