// relu(a + b), out-of-place or in place (out == a): the residual join of a ResNet block when the
// conv epilogue could not take the residual. Purely bandwidth bound, so the one thing that
// matters is moving 16 bytes per load/store (LDG.128/STG.128) with enough loads in flight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace resnet_fast {
namespace {

// 16-byte vector of T, so the compiler emits one 128-bit access per vector.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum in fp32 then round once, as the reference does (a + b in fp16 then relu rounds once too:
// the sum of two fp16 values is exact in fp32, so both give the correctly rounded result).
// fmaxf(NaN, 0) would return 0 and hide a NaN, so ReLU is written as a compare that keeps NaN.
__device__ __forceinline__ float relu_keep_nan(float s) { return s < 0.f ? 0.f : s; }

// Grid-stride over 16-byte vectors. 64-bit indices: a batch-256 ResNet activation exceeds 2^31
// elements. `vectorized` is false when any pointer is not 16-byte aligned (a view with a storage
// offset): then every element goes through the scalar path.
template <typename T>
__global__ void add_relu_kernel(const T* a, const T* b, T* out, int64_t numel, bool vectorized) {
  // No __restrict__: `out` aliases `a` in the in-place op (and add_relu_(a, a) aliases all
  // three). Each element is read and then written by one thread, so aliasing is harmless; the
  // read-only-cache path that __restrict__ would enable buys nothing for a streaming kernel.
  constexpr int kN = Vec16<T>::kN;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  int64_t scalar_start = 0;
  if (vectorized) {
    const int64_t nvec = numel / kN;
    auto av = reinterpret_cast<const Vec16<T>*>(a);
    auto bv = reinterpret_cast<const Vec16<T>*>(b);
    auto ov = reinterpret_cast<Vec16<T>*>(out);
    for (int64_t i = tid; i < nvec; i += nthreads) {
      Vec16<T> x = av[i], y = bv[i], z;
#pragma unroll
      for (int j = 0; j < kN; ++j) z.v[j] = from_f<T>(relu_keep_nan(to_f(x.v[j]) + to_f(y.v[j])));
      ov[i] = z;
    }
    scalar_start = nvec * kN;
  }
  // The tail (fewer than kN elements), or everything when unaligned.
  for (int64_t i = scalar_start + tid; i < numel; i += nthreads)
    out[i] = from_f<T>(relu_keep_nan(to_f(a[i]) + to_f(b[i])));
}

template <typename T>
cudaError_t launch(const void* a, const void* b, void* out, int64_t numel, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const bool vectorized = ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                            reinterpret_cast<uintptr_t>(out)) % 16) == 0;
  constexpr int kThreads = 256;
  const int64_t work = vectorized ? (numel + Vec16<T>::kN - 1) / Vec16<T>::kN : numel;
  // Enough blocks to fill the GPU several times over; beyond that the grid-stride loop takes
  // over (and the block count stays far below the 2^31-1 grid limit).
  int device = 0;
  cudaGetDevice(&device);
  static int sm_count[64] = {};  // per device, queried once (benign race: same value written)
  int sms = device < 64 ? sm_count[device] : 0;
  if (sms == 0) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (sms <= 0) sms = 132;
    if (device < 64) sm_count[device] = sms;
  }
  const int64_t max_blocks = int64_t(sms) * 8;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  add_relu_kernel<T><<<int(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), numel, vectorized);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_add_relu(DType dtype, const void* a, const void* b, void* out, int64_t numel,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf: return launch<__half>(a, b, out, numel, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, b, out, numel, stream);
    case DType::kFloat32: return launch<float>(a, b, out, numel, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace resnet_fast
