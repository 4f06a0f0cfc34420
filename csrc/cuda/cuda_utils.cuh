// Device helpers shared by csrc/cuda kernels: 16-byte packs, block-wide sums, dtype plumbing, launch checks.
//
// Pack<T, V>: V elements of T loaded/stored with one 16-byte access (V = 16 / sizeof(T)) when the row stream is
// 16-byte aligned and its length a multiple of V; V = 1 otherwise. acc_t = float (double for float64 tensors).
#pragma once

// Not <ATen/ATen.h>: it pulls the declarations of every ATen op (ATen/Functions.h) into each .cu file, the bulk of
// nvcc's time on them (cudafe++, cicc and the host compiler each parse it). Tensor, dispatch macros and at::empty /
// at::result_type are all the kernels use.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/result_type.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

#include "../common/host_args.h"

namespace ckpt_ext {
namespace cuda {

using host::acc_dtype;
using host::acc_type;
using host::as_contig;
using host::parse_approximate;

// A type as a value, to pick template arguments inside AT_DISPATCH lambdas.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename T>
constexpr int kPack = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// True when every pointer is 16-byte aligned and the row length (elements) is a multiple of the pack.
template <typename T>
inline bool packable(int64_t len, std::initializer_list<const void*> ptrs) {
  if (len % kPack<T> != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum of (a, b) over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t sa[32], sb[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // the previous call's readers are done with sa/sb
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  a = lane < warps ? sa[lane] : acc_t(0);
  b = lane < warps ? sb[lane] : acc_t(0);
  a = warp_sum(a);
  b = warp_sum(b);
}

// Threads per block for a row of d elements read in packs of V: a multiple of 32 in [32, 512].
inline int row_threads(int64_t d, int v) {
  const int64_t want = (d / v + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, want)));
}

}  // namespace cuda
}  // namespace ckpt_ext
