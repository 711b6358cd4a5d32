// The torch side of the CUDA backend: argument checks, kernel choice (measured once per layer
// shape), and the CUDA kernels of the three contract ops registered with the dispatcher.
//
// The op *schemas* are not here: resnet_fast.ops.define_backend_ops("cuda") defines them in
// Python (one schema source for every backend); this file only adds CUDA kernels with
// TORCH_LIBRARY_IMPL. The dispatcher checks each kernel's C++ signature against the schema
// whichever of the two registrations comes first, so a mismatch fails at load time.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.h"

#ifndef RESNET_FAST_ARCH
#error "build with -DRESNET_FAST_ARCH=<compute capability, e.g. 80 or 90>"
#endif

namespace resnet_fast {
namespace {

constexpr const char* kOp = "resnet_fast::conv_bn_act_cuda";

// ---------------------------------------------------------------------------------------------
// Message text. Numbers, shapes, devices and dtypes are turned into strings here, so that
// TORCH_CHECK (c10::str, an ostringstream) only ever receives const char* / std::string, and
// this extension has no numeric ostream insertion (operator<<(long), ArrayRef's operator<<,
// c10::Join) of its own. On the GPU machine (2026-11-25, H100, torch 2.11+cu130, JIT-built
// there) the .so carried its own instantiation of ostream::_M_insert<long>, whose facet lookup
// landed on the wrong facet and segfaulted -- first in the shape-key builder, then in every
// TORCH_CHECK that formatted a number, turning a clean error into a crash. Strings go through
// libstdc++'s __ostream_insert, which never touches num_put.
// ---------------------------------------------------------------------------------------------
std::string num(int64_t v) { return std::to_string(v); }

std::string shape_str(at::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(a[i]);
  }
  return out + "]";
}

std::string dev_str(const at::Device& d) { return d.str(); }  // Device::str lives in libc10

const char* dtype_str(at::ScalarType t) { return c10::toString(t); }

std::string join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i) out += sep;
    out += parts[i];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Checks. Every message says what was wrong and what to do; none of these can be reached through
// resnet_fast.ops.conv_bn_act with a converted model (the Python side checks and falls back
// first), so they guard direct torch.ops calls.
// ---------------------------------------------------------------------------------------------
DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK(false, "unsupported dtype ", dtype_str(t));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_device_arch(const at::Tensor& x, const char* op) {
  // The .so holds SASS for one architecture (RESNET_FAST_ARCH); running it on another GPU would
  // fail with "no kernel image" at the first launch, so say so up front.
  const auto* prop = at::cuda::getDeviceProperties(x.get_device());
  const int cc = prop->major * 10 + prop->minor;
  const bool ok = (RESNET_FAST_ARCH >= 90) ? cc == RESNET_FAST_ARCH
                                           : (prop->major == RESNET_FAST_ARCH / 10 && cc >= RESNET_FAST_ARCH);
  TORCH_CHECK(ok, op, ": this build of the resnet_fast CUDA extension is for sm_",
              num(RESNET_FAST_ARCH), " but ", dev_str(x.device()), " is sm_", num(cc), " (",
              static_cast<const char*>(prop->name),
              "); the extension is built per GPU architecture on first use, so this means it was "
              "loaded for another GPU in this process");
}

void check_nhwc(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D, got ", num(t.dim()), "-D of shape ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
              " must be dense NHWC in memory; pass ", name,
              ".contiguous(memory_format=torch.channels_last) (got strides ", shape_str(t.strides()),
              ")");
  TORCH_CHECK(aligned16(t.data_ptr()), op, ": ", name,
              " must start on a 16-byte boundary (it is a view with an odd storage offset); "
              "pass a fresh tensor or .clone(memory_format=torch.channels_last)");
}

// ---------------------------------------------------------------------------------------------
// Kernel choice. The candidate (family, tile config) pairs that can take a shape are timed once
// on its first eager call and the fastest is remembered for that shape, for the process.
// ---------------------------------------------------------------------------------------------
struct Choice {
  const ConvFamily* family;
  int config;
};

std::vector<const ConvFamily*> families_for_device() {
  std::vector<const ConvFamily*> f;
#ifdef RESNET_FAST_WITH_SM90
  f.push_back(&conv_family_sm90());  // Hopper first: the fast path when it can take the shape
#endif
  f.push_back(&conv_family_sm80());
  return f;
}

std::mutex g_mutex;
std::unordered_map<std::string, Choice> g_choices;  // shape key -> choice
std::string g_forced;                                 // "" = auto; else a config name (tests)

// Plain string appends, not an ostringstream (see "Message text" above); a key needs no locale.
std::string shape_key(const ConvCall& c, int device) {
  std::string k = "dev" + std::to_string(device) + (c.dtype == DType::kHalf ? " f16" : " bf16");
  for (auto [name, v] : {std::pair<const char*, int64_t>{" n", c.n}, {" h", c.h}, {" w", c.wd},
                         {" c", c.c}, {" k", c.k}, {" r", c.r}, {" s", c.s}, {" pad", c.pad_h},
                         {",", c.pad_w}, {" st", c.stride_h}, {",", c.stride_w},
                         {" dil", c.dil_h}, {",", c.dil_w}}) {
    k += name;
    k += std::to_string(v);
  }
  if (c.residual) k += " res";
  return k;
}

std::string config_label(const Choice& ch) { return ch.family->config_name(ch.config); }

// The workspace comes from torch's caching allocator: no cudaMalloc inside a graph capture and
// no leak. (Both kernel families need 0 bytes for these problems, but ask anyway.)
at::Tensor workspace_for(const ConvCall& c, const Choice& ch, const at::Tensor& like) {
  size_t bytes = ch.family->workspace_bytes(c, ch.config);
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

void launch_or_throw(const ConvCall& c, const Choice& ch, const at::Tensor& like, cudaStream_t stream) {
  at::Tensor ws = workspace_for(c, ch, like);
  LaunchStatus st = ch.family->launch(c, ch.config, ws.data_ptr(), stream);
  TORCH_CHECK(st.result == LaunchResult::kOk, kOp, ": kernel ", config_label(ch), " failed: ", st.message);
}

// A first guess with no measurement (used while a CUDA graph is being captured, where timing
// would break the capture): the widest tile of the preferred family when it yields at least a
// wave of CTAs, otherwise the narrowest, which has the most CTAs.
Choice heuristic(const std::vector<Choice>& cands, const ConvCall& c, int num_sms) {
  const ConvFamily* fam = cands.front().family;
  std::vector<Choice> same;
  for (const auto& ch : cands) if (ch.family == fam) same.push_back(ch);
  const int64_t m = int64_t(c.n) * c.p * c.q;
  const int64_t ctas_wide = ((m + 127) / 128) * ((c.k + 127) / 128);
  return (ctas_wide >= num_sms && c.k >= 128) ? same.front() : same.back();
}

Choice measure(const std::vector<Choice>& cands, const ConvCall& c, const at::Tensor& like,
               cudaStream_t stream) {
  cudaEvent_t start, stop;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  Choice best = cands.front();
  float best_ms = 1e30f;
  for (const auto& ch : cands) {
    at::Tensor ws = workspace_for(c, ch, like);
    // One warm-up (first launch pays for module load and the smem attribute), then 3 timed.
    LaunchStatus st = ch.family->launch(c, ch.config, ws.data_ptr(), stream);
    if (st.result != LaunchResult::kOk) continue;
    C10_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int i = 0; i < 3; ++i) ch.family->launch(c, ch.config, ws.data_ptr(), stream);
    C10_CUDA_CHECK(cudaEventRecord(stop, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (ms < best_ms) { best_ms = ms; best = ch; }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return best;
}

Choice choose(const ConvCall& c, const at::Tensor& like, cudaStream_t stream) {
  std::vector<Choice> cands;
  std::string why_not;
  for (const ConvFamily* fam : families_for_device()) {
    for (int i = 0; i < fam->num_configs(); ++i) {
      LaunchStatus st = fam->can_implement(c, i);
      if (st.result == LaunchResult::kOk) cands.push_back({fam, i});
      else why_not += std::string(" ") + fam->config_name(i) + ": " + st.message + ";";
    }
  }
  TORCH_CHECK(!cands.empty(), kOp, ": no compiled kernel can take this conv (x ", num(c.n), "x",
              num(c.c), "x", num(c.h), "x", num(c.wd), ", weight ", num(c.k), "x", num(c.c), "x",
              num(c.r), "x", num(c.s), "):", why_not, " use backend='torch' for it");
  std::string forced;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    forced = g_forced;
  }
  if (!forced.empty()) {
    for (const auto& ch : cands) if (forced == config_label(ch)) return ch;
    TORCH_CHECK(false, kOp, ": forced config '", forced, "' cannot take this shape or is not built;",
                why_not);
  }
  const int device = like.get_device();
  const std::string key = shape_key(c, device);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_choices.find(key);
    if (it != g_choices.end()) return it->second;
  }
  if (cands.size() == 1) return cands.front();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // Not remembered: the first eager call of this shape still measures.
    return heuristic(cands, c, at::cuda::getDeviceProperties(device)->multiProcessorCount);
  }
  Choice best = measure(cands, c, like, stream);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_choices.emplace(key, best);
  return best;
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------
at::Tensor conv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, const std::optional<at::Tensor>& residual, bool relu,
                            const std::optional<at::Tensor>& pre_scale,
                            const std::optional<at::Tensor>& pre_bias) {
  TORCH_CHECK(!pre_scale.has_value() && !pre_bias.has_value(), kOp,
              ": the pre-activation prologue (pre_scale/pre_bias) is not supported by the CUTLASS "
              "kernels; call resnet_fast.ops.conv_bn_act(..., backend='cuda'), which runs the "
              "reference for such calls, or pick backend='triton' or 'torch'");
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", dev_str(x.device()));
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, kOp,
              ": only float16 and bfloat16 are compiled, got ", dtype_str(x.scalar_type()),
              "; use backend='torch' or 'triton' for other dtypes");
  TORCH_CHECK(groups == 1, kOp, ": grouped convolution (groups=", num(groups), ") is not supported");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOp,
              ": stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              kOp, ": invalid stride ", shape_str(stride), ", padding ", shape_str(padding),
              " or dilation ", shape_str(dilation));
  c10::cuda::CUDAGuard guard(x.device());
  check_device_arch(x, kOp);
  check_nhwc(x, "x", kOp);
  TORCH_CHECK(weight.device() == x.device() && weight.scalar_type() == x.scalar_type(), kOp,
              ": weight must be on ", dev_str(x.device()), " with dtype ", dtype_str(x.scalar_type()),
              ", got ", dev_str(weight.device()), " ", dtype_str(weight.scalar_type()));
  check_nhwc(weight, "weight", kOp);  // (Cout, Cin, kh, kw) logical, KRSC in memory
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = weight.size(0), r = weight.size(2), s = weight.size(3);
  TORCH_CHECK(weight.size(1) == c, kOp, ": x has ", num(c), " channels but weight ",
              shape_str(weight.sizes()), " expects ", num(weight.size(1)));
  TORCH_CHECK(c % 8 == 0 && k % 8 == 0, kOp, ": input and output channels must be multiples of 8 "
              "(16-byte vectors), got Cin=", num(c), " Cout=", num(k),
              "; use backend='torch' for this layer");
  TORCH_CHECK(bias.device() == x.device() && bias.scalar_type() == at::kFloat && bias.dim() == 1 &&
                  bias.size(0) == k && bias.is_contiguous() && aligned16(bias.data_ptr()),
              kOp, ": bias must be a contiguous, 16-byte aligned float32 tensor of shape (", num(k),
              ",) on ", dev_str(x.device()), ", got ", shape_str(bias.sizes()), " ",
              dtype_str(bias.scalar_type()), " on ", dev_str(bias.device()));
  const int64_t p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) / stride[0] + 1;
  const int64_t q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(p > 0 && q > 0, kOp, ": input ", num(h), "x", num(w), " is too small for a ", num(r),
              "x", num(s), " kernel with padding ", shape_str(padding), " and dilation ",
              shape_str(dilation));
  if (residual.has_value()) {
    const at::Tensor& res = *residual;
    TORCH_CHECK(res.device() == x.device() && res.scalar_type() == x.scalar_type(), kOp,
                ": residual must be on ", dev_str(x.device()), " with dtype ",
                dtype_str(x.scalar_type()));
    TORCH_CHECK(res.dim() == 4 && res.size(0) == n && res.size(1) == k && res.size(2) == p && res.size(3) == q,
                kOp, ": residual has shape ", shape_str(res.sizes()), " but the conv output is ",
                shape_str({n, k, p, q}));
    check_nhwc(res, "residual", kOp);
  }
  // CUTLASS 2.x indexes with 32-bit offsets; larger tensors are split by the caller (or run on torch).
  const int64_t kMax = (int64_t(1) << 31) / 2;
  TORCH_CHECK(x.numel() < kMax && n * k * p * q < kMax, kOp,
              ": tensors over 2^30 elements are not supported; split the batch");

  at::Tensor y = at::empty({n, k, p, q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  TORCH_CHECK(aligned16(y.data_ptr()), kOp, ": internal error: unaligned output allocation");

  ConvCall call{};
  call.dtype = to_dtype(x.scalar_type());
  call.x = x.data_ptr();
  call.w = weight.data_ptr();
  call.bias = bias.data_ptr<float>();
  call.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  call.y = y.data_ptr();
  call.n = int(n); call.h = int(h); call.wd = int(w); call.c = int(c);
  call.k = int(k); call.r = int(r); call.s = int(s); call.p = int(p); call.q = int(q);
  call.pad_h = int(padding[0]); call.pad_w = int(padding[1]);
  call.stride_h = int(stride[0]); call.stride_w = int(stride[1]);
  call.dil_h = int(dilation[0]); call.dil_w = int(dilation[1]);
  call.relu = relu;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Choice ch = choose(call, x, stream);
  launch_or_throw(call, ch, x, stream);
  return y;
}

void check_add_relu(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.is_cuda() && b.device() == a.device(), op, ": a and b must be on one CUDA device, got ",
              dev_str(a.device()), " and ", dev_str(b.device()));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must have one dtype, got ",
              dtype_str(a.scalar_type()), " and ", dtype_str(b.scalar_type()));
  TORCH_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16 ||
                  a.scalar_type() == at::kFloat,
              op, ": float16, bfloat16 or float32 only, got ", dtype_str(a.scalar_type()));
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": a and b must have one shape, got ", shape_str(a.sizes()),
              " and ", shape_str(b.sizes()));
  // The kernel walks raw memory, so both must be dense with the same strides (e.g. both
  // channels_last, or both contiguous): then element i of a's memory is element i of b's.
  TORCH_CHECK(a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense() &&
                  a.strides() == b.strides(),
              op, ": a and b must be dense with identical strides (got ", shape_str(a.strides()), " and ",
              shape_str(b.strides()), "); make both .contiguous(memory_format=...) with one format");
}

at::Tensor add_relu_cuda(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "resnet_fast::add_relu_cuda";
  check_add_relu(a, b, op);
  c10::cuda::CUDAGuard guard(a.device());
  check_device_arch(a, op);
  at::Tensor out = at::empty_like(a);  // preserve_format: same strides as a for a dense a
  TORCH_CHECK(out.strides() == a.strides(), op, ": internal error: output strides differ");
  C10_CUDA_CHECK(launch_add_relu(to_dtype(a.scalar_type()), a.data_ptr(), b.data_ptr(), out.data_ptr(),
                                 a.numel(), at::cuda::getCurrentCUDAStream()));
  return out;
}

void add_relu_inplace_cuda(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "resnet_fast::add_relu_inplace_cuda";
  check_add_relu(a, b, op);
  c10::cuda::CUDAGuard guard(a.device());
  check_device_arch(a, op);
  C10_CUDA_CHECK(launch_add_relu(to_dtype(a.scalar_type()), a.data_ptr(), b.data_ptr(), a.data_ptr(),
                                 a.numel(), at::cuda::getCurrentCUDAStream()));
}

// ---------------------------------------------------------------------------------------------
// Introspection for tests and benchmarks (private ops, not part of the contract)
// ---------------------------------------------------------------------------------------------
std::vector<std::string> conv_configs() {
  std::vector<std::string> names;
  for (const ConvFamily* fam : families_for_device())
    for (int i = 0; i < fam->num_configs(); ++i) names.push_back(fam->config_name(i));
  return names;
}

void force_conv_config(const std::string& name) {
  if (!name.empty()) {
    auto names = conv_configs();
    TORCH_CHECK(std::find(names.begin(), names.end(), name) != names.end(), "unknown conv config '",
                name, "'; this build has: ", join(names, ", "));
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_forced = name;
}

std::vector<std::string> conv_choices() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<std::string> out;
  for (const auto& kv : g_choices) out.push_back(kv.first + " -> " + config_label(kv.second));
  std::sort(out.begin(), out.end());
  return out;
}

std::string build_info() {
  std::string s = "arch=sm_" + num(RESNET_FAST_ARCH);
#ifdef RESNET_FAST_WITH_SM90
  s += "a sm90_kernels=yes";
#else
  s += " sm90_kernels=no";
#endif
  return s;
}

}  // namespace
}  // namespace resnet_fast

// Kernels for the schemas defined in Python (resnet_fast.ops.define_backend_ops("cuda")).
TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("conv_bn_act_cuda", &resnet_fast::conv_bn_act_cuda);
  m.impl("add_relu_cuda", &resnet_fast::add_relu_cuda);
  m.impl("add_relu_inplace_cuda", &resnet_fast::add_relu_inplace_cuda);
}

// Private helpers of this extension only (their schemas live here because no other backend has
// them). Not traced, not part of the op contract.
TORCH_LIBRARY_FRAGMENT(resnet_fast, m) {
  m.def("_cuda_conv_configs() -> str[]", &resnet_fast::conv_configs);
  m.def("_cuda_force_conv_config(str name) -> ()", &resnet_fast::force_conv_config);
  m.def("_cuda_conv_choices() -> str[]", &resnet_fast::conv_choices);
  m.def("_cuda_build_info() -> str", &resnet_fast::build_info);
}
