// Torch bindings for the W4A4 kernels: argument checks, allocation, stream, launch.
// The layouts are documented in w4a4_int8.cu; the weight repack (file -> fragment layout) is done
// once per layer and device in nunchaku_ext/backends/cuda.py with plain torch ops.
#include <torch/extension.h>
// c10 only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers a minimal toolkit lacks)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "w4a16_gemv.h"
#include "w4a4_int8.h"
#include "w4a4_mlp.h"

namespace {

void check_cuda_error(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "svdq cuda: ", what, " failed: ", cudaGetErrorString(e),
              e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction
                  ? " (the extension was not built for this GPU's architecture: rebuild it, e.g. clear the "
                    "comfyui-svdquant kernel cache)"
                  : "");
}

void check_f32(const at::Tensor& t, const char* name, std::vector<int64_t> shape, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The bindings name the GEMM's MMA flavour by its instruction (nunchaku_ext/backends/cuda.py picks one
// per GPU); it also fixes the packed layout, so kernel A and the GEMM must be given the same one.
svdq::MmaPath parse_mma_path(const std::string& name) {
  if (name == "s8_m16n8k32") return svdq::MmaPath::kS8m16n8k32;
  if (name == "s4_m16n8k64") return svdq::MmaPath::kS4m16n8k64;
  if (name == "s4_m8n8k32") return svdq::MmaPath::kS4m8n8k32;
  if (name == "e2m1_s8_m16n8k16") return svdq::MmaPath::kE2M1S8m16n8k16;
  if (name == "e2m1_bs_m16n8k64") return svdq::MmaPath::kE2M1BlockScaledM16n8k64;
  TORCH_CHECK(false, "unknown mma_path '", name,
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
  TORCH_CHECK(!act_unsigned, "NVFP4 (E2M1) activations are signed; act_unsigned is for INT4 layers only");
  return 4;
}

// x [M, K] bf16/fp16 (row stride multiple of 4, unit column stride), smooth fp32 [K],
// lora_down fp32 [R, K]. Returns (act_packed int32 [M_pad/16, K/64, 32, 4], act_scales fp32
// [K/64, M_pad], lora_act fp32 [M_pad, R16]) with M_pad = M rounded up to the GEMM block tile
// (NVFP4: K64/64 chunks and [K64/16, M_pad] scales).
// Optional outputs (tests pass NaN/garbage-filled ones so that an element the kernel fails to write
// cannot pass by reusing memory that happened to hold the right value).
std::vector<at::Tensor> quantize_act_lora_down(const at::Tensor& x, const at::Tensor& smooth,
                                               const at::Tensor& lora_down, bool act_unsigned,
                                               const std::string& mma_path,
                                               c10::optional<at::Tensor> act_packed_out,
                                               c10::optional<at::Tensor> act_scales_out,
                                               c10::optional<at::Tensor> lora_act_out) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x must be a 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  const svdq::MmaPath path = parse_mma_path(mma_path);
  const int64_t scale_groups = scale_groups_per_64(path, act_unsigned), group = svdq::kGroup / scale_groups;
  TORCH_CHECK(K % group == 0 && K > 0, "in_features ", K, " is not a positive multiple of ", group);
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 8 == 0,
              "x needs unit column stride, a row stride divisible by 4 and 8-byte alignment");
  TORCH_CHECK(M > 0 && M < (int64_t(1) << 31) - svdq::kGemmBlockM, "bad number of rows ", M);
  const at::Device dev = x.device();
  const int64_t R = lora_down.size(0);
  check_f32(smooth, "smooth", {K}, dev);
  check_f32(lora_down, "lora_down", {R, K}, dev);
  const int64_t M_pad = round_up(M, svdq::kGemmBlockM), G = round_up(K, svdq::kGroup) / svdq::kGroup;
  const int64_t R16 = round_up(R, 16);
  int max_rank = 0;
  check_cuda_error(svdq::quantize_max_rank(dev.index(), &max_rank), "shared-memory query");
  TORCH_CHECK(R <= max_rank, "rank ", R, " is too large for the quantize kernel on this GPU (max ", max_rank,
              ": its fp32 accumulator of 16 rows x rank must fit in a block's shared memory)");

  const c10::cuda::CUDAGuard guard(dev);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor act_packed = act_packed_out ? *act_packed_out : at::empty({M_pad / 16, G, 32, 4}, x.options().dtype(at::kInt));
  at::Tensor act_scales = act_scales_out ? *act_scales_out : at::empty({G * scale_groups, M_pad}, f32);
  at::Tensor lora_act = lora_act_out ? *lora_act_out : at::empty({M_pad, R16}, f32);
  TORCH_CHECK(act_packed.device() == dev && act_packed.scalar_type() == at::kInt && act_packed.is_contiguous() &&
                  act_packed.sizes() == at::IntArrayRef({M_pad / 16, G, 32, 4}),
              "act_packed_out must be int32 [M_pad/16, K/64, 32, 4]");
  check_f32(act_scales, "act_scales_out", {G * scale_groups, M_pad}, dev);
  check_f32(lora_act, "lora_act_out", {M_pad, R16}, dev);

  svdq::QuantizeArgs a;
  a.x = x.data_ptr();
  a.ldx = x.stride(0);
  a.smooth = smooth.data_ptr<float>();
  a.lora_down = lora_down.data_ptr<float>();
  a.M = static_cast<int>(M);
  a.K = static_cast<int>(K);
  a.M_pad = static_cast<int>(M_pad);
  a.R = static_cast<int>(R);
  a.R16 = static_cast<int>(R16);
  a.act_packed = act_packed.data_ptr();
  a.act_scales = act_scales.data_ptr<float>();
  a.lora_act = lora_act.data_ptr<float>();
  check_cuda_error(svdq::launch_quantize_act_lora_down(a, x.scalar_type() == at::kBFloat16, act_unsigned, path,
                                                       c10::cuda::getCurrentCUDAStream().stream()),
                   "quantize_act_lora_down kernel");
  return {act_packed, act_scales, lora_act};
}

// The GEMM. act_* as returned above; wgt_packed int32 [N_pad/16, K/64, 32, 4], wgt_scales fp32
// [K/64, N_pad] ([K64/16, N_pad] for NVFP4), lora_up fp32 [N_pad, R16], bias fp32 [N_pad]; NVFP4 only:
// alpha (wtscale / 4) and channel_scale fp32 [N_pad] (wcscales), the factors on the quantized branch.
// Returns y [M, N] in out_dtype.
// The GEMM's operand checks, shared by w4a4_gemm and w4a4_mlp_fc1: its arguments, less the output.
svdq::GemmArgs checked_gemm_args(const at::Tensor& act_packed, const at::Tensor& act_scales, const at::Tensor& lora_act,
                                 const at::Tensor& wgt_packed, const at::Tensor& wgt_scales, const at::Tensor& lora_up,
                                 const at::Tensor& bias, int64_t M, int64_t N, bool act_unsigned, svdq::MmaPath path,
                                 double alpha, const c10::optional<at::Tensor>& channel_scale) {
  const int64_t scale_groups = scale_groups_per_64(path, act_unsigned);
  TORCH_CHECK(act_packed.is_cuda() && act_packed.dim() == 4 && act_packed.scalar_type() == at::kInt,
              "act_packed must be the int32 CUDA tensor made by quantize_act_lora_down");
  const at::Device dev = act_packed.device();
  const int64_t M_pad = act_packed.size(0) * 16, G = act_packed.size(1);
  const int64_t N_pad = wgt_packed.size(0) * 16, R16 = lora_act.size(1);
  TORCH_CHECK(M_pad % svdq::kGemmBlockM == 0 && M <= M_pad && M > M_pad - svdq::kGemmBlockM, "M ", M,
              " does not match the packed activations");
  TORCH_CHECK(N_pad % svdq::kGemmBlockN == 0 && N <= N_pad && N > 0, "N ", N, " does not match the packed weights");
  TORCH_CHECK(act_packed.is_contiguous() && act_packed.size(2) == 32 && act_packed.size(3) == 4, "act_packed layout");
  TORCH_CHECK(wgt_packed.device() == dev && wgt_packed.scalar_type() == at::kInt && wgt_packed.is_contiguous() &&
                  wgt_packed.dim() == 4 && wgt_packed.size(1) == G && wgt_packed.size(2) == 32 && wgt_packed.size(3) == 4,
              "wgt_packed must be int32 [N_pad/16, K/64, 32, 4] on ", dev, " with the same K as the activations");
  check_f32(act_scales, "act_scales", {G * scale_groups, M_pad}, dev);
  check_f32(lora_act, "lora_act", {M_pad, R16}, dev);
  check_f32(wgt_scales, "wgt_scales", {G * scale_groups, N_pad}, dev);
  check_f32(lora_up, "lora_up", {N_pad, R16}, dev);
  check_f32(bias, "bias", {N_pad}, dev);
  TORCH_CHECK(R16 % 16 == 0, "rank must be padded to a multiple of 16");
  TORCH_CHECK((scale_groups > 1) == channel_scale.has_value(), "channel_scale is given for NVFP4 layers, only");
  if (channel_scale) check_f32(*channel_scale, "channel_scale", {N_pad}, dev);
  TORCH_CHECK(N_pad / svdq::kGemmBlockN < 65536 * 1024 && M_pad / svdq::kGemmBlockM < 65536, "problem too large");

  svdq::GemmArgs a;
  a.act_packed = act_packed.data_ptr();
  a.act_scales = act_scales.data_ptr<float>();
  a.lora_act = lora_act.data_ptr<float>();
  a.wgt_packed = wgt_packed.data_ptr();
  a.wgt_scales = wgt_scales.data_ptr<float>();
  a.lora_up = lora_up.data_ptr<float>();
  a.bias = bias.data_ptr<float>();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.M_pad = static_cast<int>(M_pad);
  a.N_pad = static_cast<int>(N_pad);
  a.G = static_cast<int>(G);
  a.R16 = static_cast<int>(R16);
  a.alpha = static_cast<float>(alpha);
  a.channel_scale = channel_scale ? channel_scale->data_ptr<float>() : nullptr;
  return a;
}

at::Tensor w4a4_gemm(const at::Tensor& act_packed, const at::Tensor& act_scales, const at::Tensor& lora_act,
                     const at::Tensor& wgt_packed, const at::Tensor& wgt_scales, const at::Tensor& lora_up,
                     const at::Tensor& bias, int64_t M, int64_t N, bool act_unsigned, const std::string& mma_path,
                     at::ScalarType out_dtype, c10::optional<at::Tensor> out_opt, double alpha,
                     c10::optional<at::Tensor> channel_scale) {
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, "output must be bfloat16 or float16");
  const svdq::MmaPath path = parse_mma_path(mma_path);
  svdq::GemmArgs a = checked_gemm_args(act_packed, act_scales, lora_act, wgt_packed, wgt_scales, lora_up, bias, M, N,
                                       act_unsigned, path, alpha, channel_scale);
  const at::Device dev = act_packed.device();
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = out_opt ? *out_opt : at::empty({M, N}, act_scales.options().dtype(out_dtype));
  TORCH_CHECK(out.device() == dev && out.scalar_type() == out_dtype && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({M, N}),
              "out must be a contiguous [M, N] tensor of the output dtype");
  a.out = out.data_ptr();
  check_cuda_error(svdq::launch_w4a4_gemm(a, out_dtype == at::kBFloat16, act_unsigned, path,
                                          c10::cuda::getCurrentCUDAStream().stream()),
                   "w4a4_gemm kernel");
  return out;
}

// The MLP's fc1 with GELU and fc2's input quantization fused (w4a4_mlp.cuh). fc1's operands as for
// w4a4_gemm (signed INT4 input, N1 = its out_features = fc2's in_features, a multiple of 64); dtype:
// the activation dtype (h is rounded to it); smooth2 fp32 [N1] and lora_down2 fp32 [R2, N1] are fc2's.
// Returns fc2's GEMM input as quantize_act_lora_down would make it from h: (act_packed int32
// [M_pad/16, N1/64, 32, 4], act_scales fp32 [N1/64, M_pad], lora_act fp32 [M_pad, R2_16]).
// Optional outputs as for quantize_act_lora_down; hidden_out (tests): h [M, N1] in dtype.
std::vector<at::Tensor> w4a4_mlp_fc1(const at::Tensor& act_packed, const at::Tensor& act_scales,
                                     const at::Tensor& lora_act, const at::Tensor& wgt_packed,
                                     const at::Tensor& wgt_scales, const at::Tensor& lora_up, const at::Tensor& bias,
                                     int64_t M, int64_t N1, const std::string& mma_path, at::ScalarType dtype,
                                     const at::Tensor& smooth2, const at::Tensor& lora_down2,
                                     c10::optional<at::Tensor> act2_packed_out, c10::optional<at::Tensor> act2_scales_out,
                                     c10::optional<at::Tensor> lora_act2_out, c10::optional<at::Tensor> hidden_out) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "dtype must be bfloat16 or float16");
  const svdq::MmaPath path = parse_mma_path(mma_path);
  TORCH_CHECK(!is_nvfp4_path(path), "the fused MLP is for INT4 layers only");
  TORCH_CHECK(N1 % svdq::kGroup == 0, "the hidden width ", N1, " is not a multiple of 64");
  svdq::MlpFc1Args a;
  a.fc1 = checked_gemm_args(act_packed, act_scales, lora_act, wgt_packed, wgt_scales, lora_up, bias, M, N1,
                            /*act_unsigned=*/false, path, 1.0, c10::nullopt);
  const at::Device dev = act_packed.device();
  const int64_t M_pad = a.fc1.M_pad, N_pad = a.fc1.N_pad, G2 = N1 / svdq::kGroup, R2 = lora_down2.size(0);
  const int64_t R2_16 = round_up(R2, 16);
  check_f32(smooth2, "smooth2", {N1}, dev);
  check_f32(lora_down2, "lora_down2", {R2, N1}, dev);

  const c10::cuda::CUDAGuard guard(dev);
  auto f32 = act_scales.options();
  at::Tensor act2 = act2_packed_out ? *act2_packed_out : at::empty({M_pad / 16, G2, 32, 4}, act_packed.options());
  at::Tensor scales2 = act2_scales_out ? *act2_scales_out : at::empty({G2, M_pad}, f32);
  at::Tensor lora_act2 = lora_act2_out ? *lora_act2_out : at::empty({M_pad, R2_16}, f32);
  TORCH_CHECK(act2.device() == dev && act2.scalar_type() == at::kInt && act2.is_contiguous() &&
                  act2.sizes() == at::IntArrayRef({M_pad / 16, G2, 32, 4}),
              "act2_packed_out must be int32 [M_pad/16, N1/64, 32, 4]");
  check_f32(scales2, "act2_scales_out", {G2, M_pad}, dev);
  check_f32(lora_act2, "lora_act2_out", {M_pad, R2_16}, dev);
  if (hidden_out)
    TORCH_CHECK(hidden_out->device() == dev && hidden_out->scalar_type() == dtype && hidden_out->is_contiguous() &&
                    hidden_out->sizes() == at::IntArrayRef({M, N1}),
                "hidden_out must be a contiguous [M, N1] tensor of dtype");
  // Each column block's part of lora_act2, summed in order by a second launch (deterministic).
  at::Tensor partial = at::empty({R2 ? N_pad / svdq::kGemmBlockN : 0, M_pad, R2_16}, f32);
  a.smooth2 = smooth2.data_ptr<float>();
  a.lora_down2 = lora_down2.data_ptr<float>();
  a.R2 = static_cast<int>(R2);
  a.R2_16 = static_cast<int>(R2_16);
  a.act2_packed = act2.data_ptr();
  a.act2_scales = scales2.data_ptr<float>();
  a.lora_partial = partial.data_ptr<float>();
  a.lora_act2 = lora_act2.data_ptr<float>();
  a.hidden_out = hidden_out ? hidden_out->data_ptr() : nullptr;
  check_cuda_error(svdq::launch_w4a4_mlp_fc1(a, dtype == at::kBFloat16, path, c10::cuda::getCurrentCUDAStream().stream()),
                   "w4a4_mlp_fc1 kernel");
  return {act2, scales2, lora_act2};
}

// W4A16 (modulation linears): x [M, K] bf16/fp16 (unit column stride, row stride multiple of 8,
// 16-byte aligned), wgt_packed int32 [N_pad/16, K/64, 32, 4], scale_zero int32 [N_pad/16, K/64, 8, 2]
// holding 16-bit (scale, zero) pairs of dtype scale_dtype, bias fp32 [N_pad]. Returns y [M, N] in x's
// dtype (layouts: w4a16_gemv.cu).
at::Tensor w4a16_gemv(const at::Tensor& x, const at::Tensor& wgt_packed, const at::Tensor& scale_zero,
                      at::ScalarType scale_dtype, const at::Tensor& bias, int64_t N, c10::optional<at::Tensor> out_opt) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x must be a 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(scale_dtype == at::kBFloat16 || scale_dtype == at::kHalf, "scales must be bfloat16 or float16");
  const at::Device dev = x.device();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % svdq::kW4A16Group == 0 && K > 0, "in_features ", K, " is not a positive multiple of 64");
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "x needs unit column stride, a row stride divisible by 8 and 16-byte alignment");
  TORCH_CHECK(M > 0 && M <= svdq::kW4A16MaxM, "W4A16 takes 1 to ", svdq::kW4A16MaxM, " rows, got ", M);
  const int64_t G = K / svdq::kW4A16Group, N_pad = wgt_packed.size(0) * 16;
  TORCH_CHECK(N_pad % svdq::kW4A16BlockN == 0 && N > 0 && N <= N_pad && N > N_pad - svdq::kW4A16BlockN,
              "N ", N, " does not match the packed weights");
  TORCH_CHECK(wgt_packed.device() == dev && wgt_packed.scalar_type() == at::kInt && wgt_packed.is_contiguous() &&
                  wgt_packed.sizes() == at::IntArrayRef({N_pad / 16, G, 32, 4}),
              "wgt_packed must be int32 [N_pad/16, K/64, 32, 4] on ", dev);
  TORCH_CHECK(scale_zero.device() == dev && scale_zero.scalar_type() == at::kInt && scale_zero.is_contiguous() &&
                  scale_zero.sizes() == at::IntArrayRef({N_pad / 16, G, 8, 2}),
              "scale_zero must be int32 [N_pad/16, K/64, 8, 2] on ", dev);
  check_f32(bias, "bias", {N_pad}, dev);
  TORCH_CHECK(N_pad / svdq::kW4A16BlockN < (int64_t(1) << 31), "problem too large");

  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = out_opt ? *out_opt : at::empty({M, N}, x.options());
  TORCH_CHECK(out.device() == dev && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({M, N}),
              "out must be a contiguous [M, N] tensor of x's dtype");
  svdq::W4A16Args a;
  a.wgt_packed = wgt_packed.data_ptr();
  a.scale_zero = scale_zero.data_ptr();
  a.bias = bias.data_ptr<float>();
  a.x = x.data_ptr();
  a.ldx = x.stride(0);
  a.out = out.data_ptr();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.N_pad = static_cast<int>(N_pad);
  a.G = static_cast<int>(G);
  check_cuda_error(svdq::launch_w4a16_gemv(a, x.scalar_type() == at::kBFloat16, scale_dtype == at::kBFloat16,
                                           c10::cuda::getCurrentCUDAStream().stream()),
                   "w4a16_gemv kernel");
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
        py::arg("act_scales"), py::arg("lora_act"), py::arg("wgt_packed"), py::arg("wgt_scales"),
        py::arg("lora_up"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("act_unsigned"),
        py::arg("mma_path"), py::arg("out_dtype"), py::arg("out") = py::none(), py::arg("alpha") = 1.0,
        py::arg("channel_scale") = py::none());
  m.def("w4a4_mlp_fc1", &w4a4_mlp_fc1, "MLP fc1 GEMM + GELU(tanh) + fc2 input quantization (kernel B, MLP variant)",
        py::arg("act_packed"), py::arg("act_scales"), py::arg("lora_act"), py::arg("wgt_packed"),
        py::arg("wgt_scales"), py::arg("lora_up"), py::arg("bias"), py::arg("M"), py::arg("N1"), py::arg("mma_path"),
        py::arg("dtype"), py::arg("smooth2"), py::arg("lora_down2"), py::arg("act2_packed_out") = py::none(),
        py::arg("act2_scales_out") = py::none(), py::arg("lora_act2_out") = py::none(),
        py::arg("hidden_out") = py::none());
  m.attr("GEMM_BLOCK_M") = svdq::kGemmBlockM;
  m.attr("GEMM_BLOCK_N") = svdq::kGemmBlockN;
  m.attr("GROUP") = svdq::kGroup;
  m.def("w4a16_gemv", &w4a16_gemv, "W4A16 linear (modulation layers): 16-bit tensor cores on 4-bit codes",
        py::arg("x"), py::arg("wgt_packed"), py::arg("scale_zero"), py::arg("scale_dtype"), py::arg("bias"),
        py::arg("N"), py::arg("out") = py::none());
  m.attr("W4A16_BLOCK_N") = svdq::kW4A16BlockN;
}
