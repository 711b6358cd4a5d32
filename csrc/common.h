// Shared by every translation unit of the resnet_fast CUDA extension: the plain-data description
// of one conv_bn_act call that the kernels consume, the launcher declarations, and the error
// checks. Kept free of torch headers so the CUTLASS .cu files (the slow ones to compile) do not
// also parse ATen; only bindings.cpp sees torch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace resnet_fast {

enum class DType { kHalf, kBFloat16, kFloat32 };

// One conv_bn_act call, already validated by bindings.cpp. All tensors are NHWC / KRSC and dense.
struct ConvCall {
  DType dtype;
  const void* x;         // (N, H, W, C)
  const void* w;         // (K, R, S, C): the folded weight, channels_last = KRSC
  const float* bias;     // (K,)
  const void* residual;  // (N, P, Q, K) or nullptr
  void* y;               // (N, P, Q, K)
  int n, h, wd, c;       // input extent (wd: width, `w` is the weight)
  int k, r, s;           // filter extent
  int p, q;              // output extent
  int pad_h, pad_w, stride_h, stride_w, dil_h, dil_w;
  bool relu;
};

// What a launcher reports. kOk: ran. kNotImplementable: this configuration cannot take the
// shape (the caller tries another). kError: it should have run and did not (message set).
enum class LaunchResult { kOk, kNotImplementable, kError };

struct LaunchStatus {
  LaunchResult result;
  std::string message;
  static LaunchStatus ok() { return {LaunchResult::kOk, ""}; }
  static LaunchStatus not_implementable(std::string why) { return {LaunchResult::kNotImplementable, std::move(why)}; }
  static LaunchStatus error(std::string why) { return {LaunchResult::kError, std::move(why)}; }
};

// A family of conv kernels (one per compiled tile configuration). `workspace` is device memory of
// at least workspace_bytes(call, config) bytes (the bindings allocate it through torch's caching
// allocator so CUDA-graph capture stays legal).
struct ConvFamily {
  const char* name;                                   // "sm80" / "sm90"
  int (*num_configs)();
  const char* (*config_name)(int config);
  LaunchStatus (*can_implement)(const ConvCall& call, int config);
  size_t (*workspace_bytes)(const ConvCall& call, int config);
  LaunchStatus (*launch)(const ConvCall& call, int config, void* workspace, cudaStream_t stream);
};

// CUTLASS 2.x implicit-GEMM conv (Ampere mma.sync; also runs on sm_90). conv_sm80.cu.
const ConvFamily& conv_family_sm80();
#ifdef RESNET_FAST_WITH_SM90
// CUTLASS 3 Hopper conv (TMA im2col + wgmma). conv_sm90.cu; only in sm_90a builds.
const ConvFamily& conv_family_sm90();
#endif

// relu(a + b) into out (out may alias a: the in-place op). numel elements of dtype. add_relu.cu.
cudaError_t launch_add_relu(DType dtype, const void* a, const void* b, void* out, int64_t numel,
                            cudaStream_t stream);

inline int element_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace resnet_fast
