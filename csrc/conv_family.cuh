// The one launch template of the CUTLASS conv families (conv_sm80.cu: CUTLASS 2.x, Ampere
// mma.sync; conv_sm90.cu: CUTLASS 3, Hopper TMA + wgmma). Both device adapters answer the same
// calls (can_implement, get_workspace_size, initialize, run), so what differs between the two
// generations is only how a call's arguments are built; a family supplies that and its tiles:
//
//   struct Family {
//     static constexpr const char* kName;              // "sm80"
//     static constexpr const char* kConfigNames[];     // one per tile configuration, in order
//     template <typename Cfg>                          // Cfg::Op: the CUTLASS device operator
//     static typename Cfg::Op::Arguments make_args(const ConvCall& call);
//   };
//   const ConvFamily& f = ConvTable<Family, Cfg0, Cfg1, ...>::family();  // Cfg<T>: per dtype
//
// and gets the ConvFamily table bindings.cpp dispatches through. A configuration index out of
// range is an error (never silently another configuration).
#pragma once

#include <string>

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include "common.h"

namespace resnet_fast {
namespace detail {

inline const char* status_str(cutlass::Status s) { return cutlass::cutlassGetStatusString(s); }

// One tile configuration of one family, for one element type.
template <typename Family, typename Cfg>
struct ConvRunner {
  using Op = typename Cfg::Op;

  static LaunchStatus can_implement(const ConvCall& c) {
    auto s = Op::can_implement(Family::template make_args<Cfg>(c));
    if (s != cutlass::Status::kSuccess) return LaunchStatus::not_implementable(status_str(s));
    return LaunchStatus::ok();
  }

  static size_t workspace(const ConvCall& c) {
    return Op::get_workspace_size(Family::template make_args<Cfg>(c));
  }

  static LaunchStatus launch(const ConvCall& c, void* workspace, cudaStream_t stream) {
    Op op;
    auto args = Family::template make_args<Cfg>(c);
    auto s = Op::can_implement(args);
    if (s != cutlass::Status::kSuccess) return LaunchStatus::not_implementable(status_str(s));
    // initialize() sets the >48 KiB dynamic shared memory attribute the first time (and, on
    // sm90, builds the TMA descriptors, which embed this call's pointers)
    s = op.initialize(args, workspace, stream);
    if (s != cutlass::Status::kSuccess)
      return LaunchStatus::error(std::string("CUTLASS ") + Family::kName +
                                 " conv initialize failed: " + status_str(s));
    s = op.run(stream);
    cudaError_t e = cudaGetLastError();
    if (s != cutlass::Status::kSuccess || e != cudaSuccess)
      return LaunchStatus::error(std::string("CUTLASS ") + Family::kName + " conv launch failed: " +
                                 status_str(s) + " / " + cudaGetErrorString(e));
    return LaunchStatus::ok();
  }
};

// A family's configurations Cfgs (class templates over the element type), as a ConvFamily.
template <typename Family, template <typename> class... Cfgs>
struct ConvTable {
  static constexpr int kNumConfigs = sizeof...(Cfgs);
  static_assert(sizeof(Family::kConfigNames) / sizeof(Family::kConfigNames[0]) == kNumConfigs,
                "one name per configuration");

  static bool exists(int config) { return config >= 0 && config < kNumConfigs; }

  // f(the runner of `config` for the call's dtype); `config` exists (the callers check). fp16
  // runs half_t, everything else bfloat16_t (fp32 is refused before this).
  template <typename R, typename F>
  static R by_config(const ConvCall& c, int config, F&& f) {
    R result{};
    int i = 0;
    ((i++ == config ? (void)(result = c.dtype == DType::kHalf
                                          ? f(ConvRunner<Family, Cfgs<cutlass::half_t>>{})
                                          : f(ConvRunner<Family, Cfgs<cutlass::bfloat16_t>>{}))
                    : (void)0),
     ...);
    return result;
  }

  static LaunchStatus no_config(int config) {
    return LaunchStatus::error(std::string(Family::kName) + " conv config " + std::to_string(config) +
                               " does not exist (" + std::to_string(kNumConfigs) + " compiled)");
  }

  static int num_configs() { return kNumConfigs; }
  static const char* config_name(int i) { return exists(i) ? Family::kConfigNames[i] : "?"; }

  static LaunchStatus can_implement(const ConvCall& c, int config) {
    if (c.dtype == DType::kFloat32) return LaunchStatus::not_implementable("fp32 is not compiled");
    if (!exists(config)) return no_config(config);
    return by_config<LaunchStatus>(c, config, [&](auto r) { return decltype(r)::can_implement(c); });
  }
  static size_t workspace_bytes(const ConvCall& c, int config) {
    if (!exists(config)) return 0;
    return by_config<size_t>(c, config, [&](auto r) { return decltype(r)::workspace(c); });
  }
  static LaunchStatus launch(const ConvCall& c, int config, void* ws, cudaStream_t stream) {
    if (c.dtype == DType::kFloat32) return LaunchStatus::not_implementable("fp32 is not compiled");
    if (!exists(config)) return no_config(config);
    return by_config<LaunchStatus>(c, config, [&](auto r) { return decltype(r)::launch(c, ws, stream); });
  }

  static const ConvFamily& family() {
    static const ConvFamily f{Family::kName, num_configs, config_name, can_implement, workspace_bytes, launch};
    return f;
  }
};

}  // namespace detail
}  // namespace resnet_fast
