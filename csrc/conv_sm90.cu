// conv + folded-BN bias (+ residual) (+ ReLU) on Hopper: a CUTLASS 3 implicit-GEMM conv whose
// main loop loads activation tiles with TMA in im2col mode (UTMALDG.IM2COL: the hardware builds
// the im2col tile, no address arithmetic in the loop) and multiplies with warpgroup MMA
// (HGMMA), warp-specialized (a producer warp issues TMA, consumer warpgroups run wgmma). Built
// only for sm_90a (wgmma and TMA im2col are not in plain sm_90).
//
// GEMM view of CUTLASS 3 fprop (conv/collective/detail.hpp): A = activation with modes
// ((w,h,n), C), B = filter with modes (k, (C,s,r)), D = ((q,p,n), k). So M = output pixels and
// N = output channels: the per-channel bias is per *column* -> LinCombPerColBiasEltAct. (The
// GPU test against F.conv2d is what settles this for real.)
//
// Epilogue (EVT): D = act(beta * C + (alpha * acc + bias)), C = residual. As in the sm80 kernel,
// two runtime switches instead of four instantiations:
//   * residual: beta = 0 makes the EVT skip the C load entirely (is_C_load_needed() is false
//     when the beta broadcast is zero), so without a residual C is never read;
//   * ReLU: LeakyReLU with a runtime slope, 0 -> ReLU, 1 -> identity; NaN stays NaN.
#include <cutlass/kernel_hardware_info.hpp>  // before the conv collectives (see shared/CUTLASS.md)

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>

#include "common.h"
#include "conv_family.cuh"

namespace resnet_fast {
namespace {

using namespace cute;

template <typename T, typename TileShape, typename KernelSchedule, typename EpilogueSchedule>
struct Sm90Conv {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;  // 16-byte TMA granularity
  using Layout = cutlass::layout::TensorNHWC;
  using ClusterShape = Shape<_1, _1, _1>;
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<
      cutlass::epilogue::thread::LeakyReLU,
      T,       // ElementOutput
      float,   // ElementCompute
      float,   // ElementBias: the fp32 bias, never rounded to T
      T,       // ElementSource: residual
      float>;  // ElementScalar (alpha, beta)
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      TileShape, ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto,
      float, float,
      T, Layout, kAlign,   // C (residual)
      T, Layout, kAlign,   // D (y)
      EpilogueSchedule, Fusion>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      T, Layout, kAlign,
      T, Layout, kAlign,
      float,
      TileShape, ClusterShape,
      // The epilogue's smem comes out of the pipeline budget; the builder fills the rest with
      // as many main-loop stages as fit.
      cutlass::conv::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop,
                                                       CollectiveMainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Op = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

// Two tiles: N = 128 for the wide layers, N = 64 so K = 64 layers do not waste half a tile and
// small late layers get twice the CTAs. Both with the basic warp-specialized schedule (one
// producer warp, one consumer warpgroup) and its matching TMA epilogue.
using Ws = cutlass::conv::KernelImplicitTmaWarpSpecializedSm90;
using WsEpi = cutlass::epilogue::TmaWarpSpecialized;
template <typename T> using Cfg0 = Sm90Conv<T, Shape<_128, _128, Shape<_64>>, Ws, WsEpi>;
template <typename T> using Cfg1 = Sm90Conv<T, Shape<_128, _64, Shape<_64>>, Ws, WsEpi>;

// The CUTLASS 3 family for the shared launch template (conv_family.cuh).
struct Sm90 {
  static constexpr const char* kName = "sm90";
  static constexpr const char* kConfigNames[] = {"sm90_128x128x64_ws", "sm90_128x64x64_ws"};

  template <typename Cfg>
  static typename Cfg::Op::Arguments make_args(const ConvCall& c);
};

template <typename Cfg>
typename Cfg::Op::Arguments Sm90::make_args(const ConvCall& c) {
  using T = typename Cfg::Op::ElementA;
  using Kernel = typename Cfg::Kernel;
  typename Cfg::ProblemShape problem(
      cutlass::conv::Mode::kCrossCorrelation,
      {c.n, c.h, c.wd, c.c},            // activation, nhwc
      {c.k, c.r, c.s, c.c},             // filter, krsc
      {c.pad_h, c.pad_w},               // lower padding
      {c.pad_h, c.pad_w},               // upper padding
      {c.stride_h, c.stride_w},
      {c.dil_h, c.dil_w},
      /*groups=*/1);
  // Output strides: D's first mode is (q, p, n) in that order, so walk the packed NPQK strides
  // backwards (this is how CUTLASS's own conv example fills them).
  typename Kernel::StrideC stride_c{};
  typename Kernel::StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideC{})>{}, [&](auto i) {
    cute::get<0, i>(stride_c) = problem.stride_C[Cfg::ProblemShape::RankT - 2 - i];
  });
  cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(stride_d) = problem.stride_C[Cfg::ProblemShape::RankT - 2 - i];
  });
  typename Cfg::Op::Arguments args{
      problem,
      {static_cast<const T*>(c.x), static_cast<const T*>(c.w)},
      {{},  // fusion arguments, filled below
       // No residual: beta = 0 and C never loaded; the TMA descriptor still needs a valid
       // address, so it describes y.
       static_cast<const T*>(c.residual ? c.residual : c.y), stride_c,
       static_cast<T*>(c.y), stride_d}};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.f;
  fusion.beta = c.residual ? 1.f : 0.f;
  fusion.bias_ptr = c.bias;
  fusion.activation.leaky_alpha = c.relu ? 0.f : 1.f;
  return args;
}

}  // namespace

const ConvFamily& conv_family_sm90() { return detail::ConvTable<Sm90, Cfg0, Cfg1>::family(); }

}  // namespace resnet_fast
