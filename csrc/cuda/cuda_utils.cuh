// Device helpers shared by csrc/cuda kernels: 16-byte packs, block-wide sums, dtype plumbing, launch checks.
//
// Pack<T, V>: V elements of T loaded/stored with one 16-byte access (V = 16 / sizeof(T)) when the row stream is
// 16-byte aligned and its length a multiple of V; V = 1 otherwise. acc_t = float (double for float64 tensors).
// Norm plumbing (layer_norm_cuda.cu, rms_norm_cuda.cu): row_rstd (the forward's block-wide 1 / std of one row),
// norm_grads (dy / dresidual in x's dtype or both in acc_t), norm_bwd_blocks / norm_bwd_threads (grid, block,
// per-thread register partials), sum_partials (the deterministic column sums of the blocks' partial rows).
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

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
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

// 1 / sqrt(mean over the row of (x - mu)^2 + eps) for one block's row xr of d values read in packs of V: the rstd of
// LayerNorm (mu = the row mean) and RMSNorm (mu = 0). Block-wide (block_sum2); every thread gets the result.
template <typename T, int V, typename acc_t>
__device__ __forceinline__ acc_t row_rstd(const T* xr, int64_t d, acc_t mu, double eps) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  acc_t sq = 0, unused = 0;
  for (int64_t j = threadIdx.x * V; j < d; j += step) {
    const Pack<T, V> p = load_pack<T, V>(xr + j);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t c = static_cast<acc_t>(p.v[k]) - mu;
      sq += c * c;
    }
  }
  block_sum2(sq, unused);
  return acc_t(1) / sqrt(sq / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
}

// Blocks of `threads` for a grid-stride loop over `packs` items: one item per thread, at most 65536 blocks.
inline unsigned flat_grid(int64_t packs, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((packs + threads - 1) / threads, 65536)));
}

// Threads per block for a row of d elements read in packs of V: a multiple of 32 in [32, 512].
inline int row_threads(int64_t d, int v) {
  const int64_t want = (d / v + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, want)));
}

constexpr int kMaxThreads = 512;  // row_threads() never launches more
constexpr int kRegChunks = 4;     // packs per thread whose norm-backward column partials stay in registers

// The column packs this thread owns in a norm backward row of d: with in_registers, chunk c < kRegChunks at column
// (threadIdx.x + c * blockDim.x) * V -> in_regs(j, c) (c a compile-time index into register arrays once unrolled);
// else every blockDim.x * V columns from threadIdx.x * V -> in_global(j).
template <int V, typename InRegs, typename InGlobal>
__device__ __forceinline__ void owned_packs(int64_t d, bool in_registers, InRegs&& in_regs, InGlobal&& in_global) {
  if (in_registers) {
#pragma unroll
    for (int c = 0; c < kRegChunks; ++c) {
      const int64_t j = (threadIdx.x + static_cast<int64_t>(c) * blockDim.x) * V;
      if (j < d) in_regs(j, c);
    }
  } else {
    const int64_t step = static_cast<int64_t>(blockDim.x) * V;
    for (int64_t j = threadIdx.x * V; j < d; j += step) in_global(j);
  }
}

// The packs at column j of one norm backward row: x, dy and, when dres_row is not null, the residual gradient.
template <typename T, typename G, int V>
struct NormBwdPacks {
  Pack<T, V> x;
  Pack<G, V> dy, res;
};

template <typename T, typename G, int V>
__device__ __forceinline__ NormBwdPacks<T, G, V> load_norm_bwd_packs(const T* xr, const G* dyr, const G* dres_row,
                                                                      int64_t j) {
  NormBwdPacks<T, G, V> p;
  p.x = load_pack<T, V>(xr + j);
  p.dy = load_pack<G, V>(dyr + j);
  if (dres_row) p.res = load_pack<G, V>(dres_row + j);
  return p;
}

// dy and dresidual of a norm backward, contiguous: in x's dtype when both come in it (same), else both widened to
// acc_t (the kernels' G type).
struct NormGrads {
  bool same;
  at::Tensor dy, res;  // res undefined without a dresidual
};

inline NormGrads norm_grads(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& dresidual,
                            bool has_res) {
  const auto xt = x.scalar_type();
  const bool same = dy.scalar_type() == xt && (!has_res || dresidual->scalar_type() == xt);
  const auto gt = same ? xt : acc_dtype(xt);
  return {same, as_contig(dy, gt), has_res ? as_contig(*dresidual, gt) : at::Tensor()};
}

// Blocks of a norm backward over n rows: each walks a fixed stripe of rows and writes one partial row per output.
inline int64_t norm_bwd_blocks(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(n, 512)); }

// (threads, in_registers) of a norm backward row of d elements read in packs of v: in_registers when each thread's
// columns fit kRegChunks packs, so its column partials stay in registers.
inline std::pair<int, bool> norm_bwd_threads(int64_t d, int v) {
  const int threads = row_threads(d, v);
  return {threads, (d + static_cast<int64_t>(threads) * v - 1) / (threads * v) <= kRegChunks};
}

// Calls body(TypeTag<G>{}, dy, dresidual-or-nullptr) with G the grads' dtype: T when grads.same, else acc_t.
template <typename T, typename F>
void with_norm_grads(const NormGrads& grads, F&& body) {
  auto run = [&](auto g_tag) {
    using G = typename decltype(g_tag)::type;
    body(g_tag, grads.dy.const_data_ptr<G>(), grads.res.defined() ? grads.res.const_data_ptr<G>() : nullptr);
  };
  grads.same ? run(TypeTag<T>{}) : run(TypeTag<acc_type<T>>{});
}

// Pack width of a kernel streaming both T and G rows: the narrower of the two packs.
template <typename T, typename G>
constexpr int kPack2 = kPack<T> < kPack<G> ? kPack<T> : kPack<G>;

// kernel<<<blocks, threads>>>(args..., n, d, in_registers) with norm_bwd_threads(d, v), then the launch check.
template <typename Kernel, typename... Args>
void launch_norm_bwd(Kernel kernel, int64_t blocks, int64_t n, int64_t d, int v, cudaStream_t stream, Args... args) {
  const auto [threads, in_registers] = norm_bwd_threads(d, v);
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(args..., n, d, in_registers);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out (H, d): out[h][j] = Σ_k partials[h * blocks + k][j], k ascending; blockIdx.y = h.
template <typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partials, int64_t blocks, int64_t d,
                                    acc_t* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const acc_t* p = partials + blockIdx.y * blocks * d + j;
  acc_t s = 0;
  for (int64_t k = 0; k < blocks; ++k) s += p[k * d];
  out[blockIdx.y * d + j] = s;
}

// The column sums of `heads` stacked (blocks, d) partial buffers into out (heads, d); nothing when d == 0.
template <typename acc_t>
void sum_partials(const at::Tensor& partials, int64_t blocks, int64_t d, const at::Tensor& out, unsigned heads,
                  cudaStream_t stream) {
  if (d == 0) return;
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>((d + threads - 1) / threads), heads);
  sum_partials_kernel<acc_t><<<grid, threads, 0, stream>>>(partials.const_data_ptr<acc_t>(), blocks, d,
                                                           out.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace ckpt_ext
