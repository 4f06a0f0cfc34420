// Residual + dropout with the seed-reproducible hash mask on CUDA (math::dropout_keep, csrc/common/ckpt_math.h).
//
// dropout_add_kernel(x (...), residual (...)?, p, seed) -> out = keep(i) ? x[i] / (1 - p) : 0 (+ residual[i]),
// i the flat row-major index, dtype result_type(x, residual); inputs are first brought to that dtype (exact).
// Grid-stride loop in packs of V elements (16-byte accesses when aligned); always a fresh output tensor.
//
// attention_tile_dropout_kernel(x (B, G, R, N) fp32/fp64, heads, seq_q, seq_k, head0, row0, p, seed): in place,
// x = keep(i) ? x / (1 - p) : 0 at the flat (B, heads, seq_q, seq_k) index i of each tile element (as on CPU,
// csrc/cpu/dropout_cpu.cpp); one thread an element, grid-stride.
#include <torch/library.h>

#include "../common/ckpt_math.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
__global__ void dropout_add_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ out,
                                   int64_t numel, uint32_t key, uint32_t thr, bool drop, acc_type<T> scale) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel; i += stride) {
    const Pack<T, V> xp = load_pack<T, V>(x + i);
    Pack<T, V> rp;
    if (res) rp = load_pack<T, V>(res + i);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const bool keep = !drop || math::dropout_keep(i + k, key, thr);
      acc_t v = keep ? static_cast<acc_t>(xp.v[k]) * scale : acc_t(0);
      if (res) v += static_cast<acc_t>(rp.v[k]);
      o.v[k] = static_cast<T>(v);
    }
    store_pack<T, V>(out + i, o);
  }
}

at::Tensor dropout_add_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual, double p, int64_t seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const host::DropoutAddBuffers buf = host::dropout_add_buffers(x, residual, p, seed);
  const int64_t numel = x.numel();
  if (numel == 0) return buf.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, buf.args.out_dtype, "dropout_add_kernel", [&] {
    constexpr int V = kPack<scalar_t>;
    const host::DropoutAddPtrs<scalar_t> ptr = buf.data<scalar_t>();
    const auto scale = static_cast<acc_type<scalar_t>>(buf.scale);
    const int v = packable<scalar_t>(numel, {ptr.x, ptr.res, ptr.out}) ? V : 1;
    const int64_t blocks = std::min<int64_t>((numel / v + kThreads - 1) / kThreads, 65536);
    const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, blocks));
    const uint32_t key = buf.key, thr = buf.threshold;
    if (v == V) {
      dropout_add_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(ptr.x, ptr.res, ptr.out, numel, key, thr, buf.drop,
                                                                     scale);
    } else {
      dropout_add_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(ptr.x, ptr.res, ptr.out, numel, key, thr, buf.drop,
                                                                     scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return buf.out;
}

template <typename T>
__global__ void attention_tile_dropout_kernel(T* __restrict__ x, int64_t numel, int64_t g, int64_t r, int64_t n,
                                              int64_t heads, int64_t seq_q, int64_t seq_k, int64_t head0,
                                              int64_t row0, uint32_t key, uint32_t thr, T scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t row = i / n, bg = row / r;
    const int64_t flat = ((bg / g * heads + head0 + bg % g) * seq_q + row0 + row % r) * seq_k + i % n;
    x[i] = math::dropout_keep(flat, key, thr) ? x[i] * scale : T(0);
  }
}

void attention_tile_dropout_cuda(const at::Tensor& x, int64_t heads, int64_t seq_q, int64_t seq_k, int64_t head0,
                                 int64_t row0, double p, int64_t seed) {
  const host::TileDropoutArgs a = host::check_tile_dropout(x, heads, seq_q, seq_k, head0, row0, p);
  const int64_t numel = x.numel();
  if (numel == 0 || p == 0.0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const uint32_t key = math::seed_key(seed), thr = math::dropout_threshold(p);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((numel + 255) / 256, 65536)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_tile_dropout_kernel", [&] {
    attention_tile_dropout_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.mutable_data_ptr<scalar_t>(), numel, a.g, a.r, a.n, heads, seq_q, seq_k, head0, row0, key, thr,
        static_cast<scalar_t>(1.0 / (1.0 - p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("dropout_add_kernel", &dropout_add_cuda);
  m.impl("attention_tile_dropout_kernel", &attention_tile_dropout_cuda);
}

}  // namespace cuda
}  // namespace ckpt_ext
