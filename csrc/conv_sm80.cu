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
#include "conv_family.cuh"

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

// The CUTLASS 2.x family for the shared launch template (conv_family.cuh).
struct Sm80 {
  static constexpr const char* kName = "sm80";
  static constexpr const char* kConfigNames[] = {"sm80_128x128x64_s3", "sm80_128x64x64_s4", "sm80_64x64x64_s4"};

  template <typename Cfg>
  static typename Cfg::Op::Arguments make_args(const ConvCall& c) {
    using Op = typename Cfg::Op;
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
};

}  // namespace

const ConvFamily& conv_family_sm80() { return detail::ConvTable<Sm80, Cfg0, Cfg1, Cfg2>::family(); }

}  // namespace resnet_fast
