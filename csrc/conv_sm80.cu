// conv + folded-BN bias (+ residual) (+ ReLU) as one CUTLASS 2.x implicit-GEMM kernel: Ampere
// tensor cores (mma.sync m16n8k16, fp32 accumulation), cp.async multistage main loop, and the
// whole epilogue applied to the accumulators before the single store of y. Runs on sm_80 and
// later (it is also the fallback on Hopper for shapes the sm_90a kernel cannot take).
//
// GEMM view of fprop (CUTLASS 2.x): M = N*P*Q output pixels, N = K output channels,
// K = R*S*C. The per-channel bias is therefore a per-*column* vector, which is exactly the
// "broadcast vector" of EpilogueWithBroadcast (ptr_Vector, ldr = 0: same row vector for every
// row).
//
// Epilogue choice: LinearCombinationBiasElementwise computes
//     z = alpha * acc + beta * C + V;   Z = Elementwise(z)
// with C = the residual tensor, V = the fp32 bias. Two runtime switches, so ONE kernel per tile
// covers all four (residual, relu) cases instead of four instantiations (compile time is the
// scarce resource here):
//   * residual: beta = 1, or beta = 0, and then is_source_needed() is false and the epilogue
//     never reads C (C may point anywhere valid);
//   * ReLU: Elementwise = LeakyReLU with a runtime slope: 0 -> ReLU, 1 -> identity. LeakyReLU
//     is written `v > 0 ? v : v * slope`, so a NaN stays NaN (NaN * 0 = NaN) where fmax would
//     silently turn it into 0.
#include <cutlass/cutlass.h>
#include <cutlass/conv/conv2d_problem_size.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
#include <cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/epilogue/thread/linear_combination_bias_elementwise.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>

#include <cstdio>

#include "common.h"

namespace resnet_fast {
namespace {

using Layout = cutlass::layout::TensorNHWC;

template <typename T, typename ThreadblockShape, typename WarpShape, int Stages>
struct Sm80Conv {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;  // 8 halves = 16 bytes
  using Epilogue = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
      T,      // ElementC: residual
      float,  // accumulator
      float,  // compute
      T,      // ElementZ: the output y
      T,      // ElementT: the pre-activation tensor, not stored (StoreT = false)
      kAlign,
      cutlass::epilogue::thread::LeakyReLU<float>,
      cutlass::plus<float>,
      /*StoreT=*/false,
      float>;  // ElementVector: the fp32 bias, read as is (no rounding to T)
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      T, Layout, T, Layout, T, Layout, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      ThreadblockShape, WarpShape, cutlass::gemm::GemmShape<16, 8, 16>,
      Epilogue,
      // Swizzle 4: neighbouring CTAs share weight tiles in L2.
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>,
      Stages, cutlass::arch::OpMultiplyAdd,
      // Optimized iterators: precomputed masks and incremental offsets (needs C % 8 == 0, which
      // the 16-byte alignment already demands). kStrided: stride 2 convs are in every ResNet.
      cutlass::conv::IteratorAlgorithm::kOptimized, cutlass::conv::StrideSupport::kStrided,
      kAlign, kAlign>::Kernel;
  using Op = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// The tile configurations. Few on purpose (each one is ~30 s of compile per dtype):
//  0: 128x128x64, 4 warps of 64x64, 3 stages (96 KiB smem): the big-GEMM workhorse (early,
//     large-spatial layers: M = N*P*Q is huge).
//  1: 128x64x64, 4 warps of 64x32, 4 stages: narrower N for K = 64 layers (no half-empty tile).
//  2: 64x64x64, 4 warps of 32x32, 4 stages: many more CTAs for the 7x7/14x14 late layers where
//     a 128x128 grid would leave most of the 108/132 SMs idle.
template <typename T> using Cfg0 = Sm80Conv<T, cutlass::gemm::GemmShape<128, 128, 64>, cutlass::gemm::GemmShape<64, 64, 64>, 3>;
template <typename T> using Cfg1 = Sm80Conv<T, cutlass::gemm::GemmShape<128, 64, 64>, cutlass::gemm::GemmShape<64, 32, 64>, 4>;
template <typename T> using Cfg2 = Sm80Conv<T, cutlass::gemm::GemmShape<64, 64, 64>, cutlass::gemm::GemmShape<32, 32, 64>, 4>;
constexpr int kNumConfigs = 3;
const char* kConfigNames[kNumConfigs] = {"sm80_128x128x64_s3", "sm80_128x64x64_s4", "sm80_64x64x64_s4"};

template <typename Op>
typename Op::Arguments make_args(const ConvCall& c) {
  using T = typename Op::ElementA;
  cutlass::conv::Conv2dProblemSize problem(
      c.n, c.h, c.wd, c.c, c.k, c.r, c.s, c.p, c.q, c.pad_h, c.pad_w, c.stride_h, c.stride_w,
      c.dil_h, c.dil_w, cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1, /*groups=*/1);
  auto x = cutlass::make_TensorRef(static_cast<T*>(const_cast<void*>(c.x)),
                                   Layout::packed({c.n, c.h, c.wd, c.c}));
  auto w = cutlass::make_TensorRef(static_cast<T*>(const_cast<void*>(c.w)),
                                   Layout::packed({c.k, c.r, c.s, c.c}));
  auto y = cutlass::make_TensorRef(static_cast<T*>(c.y), Layout::packed({c.n, c.p, c.q, c.k}));
  // No residual: beta = 0 keeps the epilogue from reading C at all; C still needs a valid
  // address for the iterator's construction, so it points at y.
  auto res = c.residual ? cutlass::make_TensorRef(static_cast<T*>(const_cast<void*>(c.residual)),
                                                  Layout::packed({c.n, c.p, c.q, c.k}))
                        : y;
  typename Op::EpilogueOutputOp::Params epi(
      /*alpha=*/1.f, /*beta=*/c.residual ? 1.f : 0.f,
      typename Op::EpilogueOutputOp::ElementwiseArguments{/*leaky_alpha=*/c.relu ? 0.f : 1.f});
  return typename Op::Arguments(problem, x, w, res, y, epi, cutlass::conv::SplitKMode::kSerial,
                                const_cast<float*>(c.bias), /*ptr_Tensor=*/nullptr,
                                /*ldr=*/0, /*ldt=*/0);
}

const char* status_str(cutlass::Status s) { return cutlass::cutlassGetStatusString(s); }

template <typename Cfg>
struct Runner {
  using Op = typename Cfg::Op;
  static LaunchStatus can_implement(const ConvCall& c) {
    auto s = Op::can_implement(make_args<Op>(c));
    if (s != cutlass::Status::kSuccess) return LaunchStatus::not_implementable(status_str(s));
    return LaunchStatus::ok();
  }
  static size_t workspace(const ConvCall& c) { return Op::get_workspace_size(make_args<Op>(c)); }
  static LaunchStatus launch(const ConvCall& c, void* workspace, cudaStream_t stream) {
    Op op;
    auto args = make_args<Op>(c);
    auto s = Op::can_implement(args);
    if (s != cutlass::Status::kSuccess) return LaunchStatus::not_implementable(status_str(s));
    // initialize() also raises the kernel's dynamic shared memory limit above 48 KiB
    // (cudaFuncSetAttribute) the first time; it is cheap after that.
    s = op.initialize(args, workspace, stream);
    if (s != cutlass::Status::kSuccess)
      return LaunchStatus::error(std::string("CUTLASS sm80 conv initialize failed: ") + status_str(s));
    s = op.run(stream);
    cudaError_t e = cudaGetLastError();
    if (s != cutlass::Status::kSuccess || e != cudaSuccess)
      return LaunchStatus::error(std::string("CUTLASS sm80 conv launch failed: ") + status_str(s) +
                                 " / " + cudaGetErrorString(e));
    return LaunchStatus::ok();
  }
};

// Dispatch (dtype, config) to a Runner. The dtype switch lives here so bindings.cpp stays free of
// CUTLASS types.
template <template <typename> class Cfg, typename F>
auto by_dtype(DType t, F&& f) {
  if (t == DType::kHalf) return f(Runner<Cfg<cutlass::half_t>>{});
  return f(Runner<Cfg<cutlass::bfloat16_t>>{});
}
template <typename F>
auto by_config(const ConvCall& c, int config, F&& f) {
  switch (config) {
    case 0: return by_dtype<Cfg0>(c.dtype, f);
    case 1: return by_dtype<Cfg1>(c.dtype, f);
    default: return by_dtype<Cfg2>(c.dtype, f);
  }
}

int num_configs() { return kNumConfigs; }
const char* config_name(int i) { return (i >= 0 && i < kNumConfigs) ? kConfigNames[i] : "?"; }
LaunchStatus can_implement(const ConvCall& c, int config) {
  if (c.dtype == DType::kFloat32) return LaunchStatus::not_implementable("fp32 is not compiled");
  return by_config(c, config, [&](auto r) { return decltype(r)::can_implement(c); });
}
size_t workspace_bytes(const ConvCall& c, int config) {
  return by_config(c, config, [&](auto r) { return decltype(r)::workspace(c); });
}
LaunchStatus launch(const ConvCall& c, int config, void* ws, cudaStream_t stream) {
  if (c.dtype == DType::kFloat32) return LaunchStatus::not_implementable("fp32 is not compiled");
  return by_config(c, config, [&](auto r) { return decltype(r)::launch(c, ws, stream); });
}

}  // namespace

const ConvFamily& conv_family_sm80() {
  static const ConvFamily f{"sm80", num_configs, config_name, can_implement, workspace_bytes, launch};
  return f;
}

}  // namespace resnet_fast
