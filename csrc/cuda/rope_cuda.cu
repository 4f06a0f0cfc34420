// Rotary position embedding of q and k in one kernel on CUDA (reference.rope), and its exact adjoint (inverse=True).
// Formulas as csrc/cpu/rope_cpu.cpp: with h = dh / 2, (sa, sb, σ) = (s1, s2, 1) forward or (s2, s1, -1) inverse,
//   o1 = x1 c1 - σ x2 sa,   o2 = x2 c2 + σ x1 sb.
// One block per token row (b, t), grid-stride over B*T; threadIdx.y walks the row's hq query heads then its hk key
// heads, threadIdx.x the h rotation pairs (j, j + h) of a head: no per-element division. q and k are read through
// their strides (unit last stride), cos/sin as acc_t (fp32, fp64 for fp64) rows; outputs contiguous in q/k dtype.
// When q and k have different dtypes each gets its own launch.
#include <torch/library.h>

#include <tuple>

#include "../common/llama_host.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {

template <typename T>
struct HeadsArg {
  const T* x;
  int64_t sb, st, sh;
  int heads;
  T* out;
};

template <typename T>
__global__ void rope_kernel(HeadsArg<T> q, HeadsArg<T> k, const acc_type<T>* __restrict__ cos,
                            const acc_type<T>* __restrict__ sin, int64_t rows, int64_t t_len, int half,
                            bool cos_batched, bool inverse) {
  using acc_t = acc_type<T>;
  const acc_t sign = inverse ? acc_t(-1) : acc_t(1);
  const int64_t dh = 2 * static_cast<int64_t>(half);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t b = r / t_len, t = r - b * t_len;
    const int64_t cs = ((cos_batched ? b : 0) * t_len + t) * dh;
    const acc_t* c = cos + cs;
    const acc_t* sa = sin + cs + (inverse ? half : 0);
    const acc_t* sb = sin + cs + (inverse ? 0 : half);
    for (int hh = threadIdx.y; hh < q.heads + k.heads; hh += blockDim.y) {
      const HeadsArg<T>& p = hh < q.heads ? q : k;
      const int head = hh < q.heads ? hh : hh - q.heads;
      const T* x = p.x + b * p.sb + t * p.st + head * p.sh;
      T* out = p.out + (r * p.heads + head) * dh;
      for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const acc_t x1 = static_cast<acc_t>(x[j]), x2 = static_cast<acc_t>(x[half + j]);
        out[j] = static_cast<T>(x1 * c[j] - sign * x2 * sa[j]);
        out[half + j] = static_cast<T>(x2 * c[half + j] + sign * x1 * sb[j]);
      }
    }
  }
}

template <typename T>
HeadsArg<T> heads_arg(const at::Tensor& x, at::Tensor& out) {
  return {x.const_data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2), static_cast<int>(x.size(2)),
          out.mutable_data_ptr<T>()};
}

at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, bool inverse) {
  const host::RopeDims dims = host::check_rope(q, k, cos, sin);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = unit_last_stride(q), kc = unit_last_stride(k);
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor q_out = at::empty(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor k_out = at::empty(k.sizes(), k.options().memory_format(contiguous));
  const int64_t rows = dims.b * dims.t;
  if (rows == 0 || dims.dh == 0) return {q_out, k_out};
  const int half = static_cast<int>(dims.dh / 2);
  const dim3 block(static_cast<unsigned>(std::min(64, (half + 31) / 32 * 32)), 4);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 1 << 20));
  auto run = [&](at::ScalarType dt, const at::Tensor* a, at::Tensor* a_out, const at::Tensor* b, at::Tensor* b_out) {
    const auto acc = acc_dtype(dt);
    const at::Tensor c = as_contig(cos, acc), s = as_contig(sin, acc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "rope_kernel", [&] {
      using acc_t = acc_type<scalar_t>;
      const HeadsArg<scalar_t> none{nullptr, 0, 0, 0, 0, nullptr};
      rope_kernel<scalar_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
          heads_arg<scalar_t>(*a, *a_out), b ? heads_arg<scalar_t>(*b, *b_out) : none, c.const_data_ptr<acc_t>(),
          s.const_data_ptr<acc_t>(), rows, dims.t, half, dims.cos_batched, inverse);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  if (q.scalar_type() == k.scalar_type()) {
    run(q.scalar_type(), &qc, &q_out, &kc, &k_out);
  } else {
    run(q.scalar_type(), &qc, &q_out, nullptr, nullptr);
    run(k.scalar_type(), &kc, &k_out, nullptr, nullptr);
  }
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) { m.impl("rope_kernel", &rope_cuda); }

}  // namespace cuda
}  // namespace ckpt_ext
