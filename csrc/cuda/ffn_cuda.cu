// Fused FFN ops on CUDA (reference.ffn_recompute / linear_bias_gelu / linear_gelu_bwd / gelu_linear_wgrad): the GEMMs
// are at::mm (cuBLAS, fp32 accumulation for 16-bit), the pointwise work around them one small kernel each, on the
// current stream, fp32 math (fp64 for fp64), formulas from csrc/common/ckpt_math.h. Same dtype rules as the CPU
// kernels (csrc/cpu/ffn_cpu.cpp), outputs always fresh tensors.
//
// ffn_recompute_kernel -> a, du (N, H) in T = dy.dtype, db1 (H,) fp32 (fp64 for fp64)
//   1. ln_apply_kernel: one block per row, y = (x1 - mean) * rstd * ln_w + ln_b in T (stats given, fp32)
//   2. u = at::mm(y, w1ᵀ), dA = at::mm(dy, w2)
//   3. ffn_epilogue_kernel: block (column tile, 32-row chunk); thread j walks its chunk's rows in order:
//      u += b1; a = gelu(u) over u's buffer; du = gelu'(u) dA over dA's buffer; partial[chunk, j] = Σ du (unrounded)
//   4. column_sum_kernel: db1[j] = Σ_chunk partial[chunk, j] in chunk order. No atomics: db1 is deterministic.
// linear_bias_gelu_kernel: m = at::mm(x, wᵀ) in promote(x, w); a = gelu(m + b) in place when m has x's dtype
//                          (a (rows, H) grid: the bias index is the column, no per-element i % H).
// linear_gelu_bwd_kernel:  m = at::mm(dy, w2) in promote(dy, w2); du = m * gelu'(u), in place when m has u's dtype.
// gelu_linear_wgrad_kernel: a = gelu(u) in u.dtype, then at::mm(dyᵀ, a) in promote(dy, u), cast to dy.dtype.
// The last three share their GEMMs, dtype rules and buffers with the CPU kernels (csrc/common/ffn_host.h).
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>

#include "../common/ckpt_math.h"
#include "../common/ffn_host.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSumRows = 32;  // rows per db1 partial: fixed, so db1 does not depend on the launch shape

using host::with_form;

// y[row, :] = (x[row, :] - mean[row]) * rstd[row] * w + b; one block per row. X is T or acc_t.
template <typename T, typename X>
__global__ void ln_apply_kernel(const X* __restrict__ x, const acc_type<T>* __restrict__ mean,
                                const acc_type<T>* __restrict__ rstd, const acc_type<T>* __restrict__ w,
                                const acc_type<T>* __restrict__ b, T* __restrict__ y, int64_t d) {
  using acc_t = acc_type<T>;
  const int64_t row = blockIdx.x;
  const X* xr = x + row * d;
  T* yr = y + row * d;
  const acc_t mu = mean[row], r = rstd[row];
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    yr[j] = static_cast<T>((static_cast<acc_t>(xr[j]) - mu) * r * w[j] + b[j]);
  }
}

// The ffn_recompute epilogue: a (u in, gelu(u + b1) out) and du (dA in, gelu'(u + b1) dA out), both (n, h) in place;
// partial[c, j] = the unrounded Σ du over chunk c's rows, in row order.
template <typename T, bool kTanh>
__global__ void ffn_epilogue_kernel(T* __restrict__ a, const acc_type<T>* __restrict__ b1, T* __restrict__ du,
                                    acc_type<T>* __restrict__ partial, int64_t n, int64_t h, int64_t chunks) {
  using acc_t = acc_type<T>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= h) return;
  const acc_t bj = b1[j];
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t end = n < (c + 1) * kSumRows ? n : (c + 1) * kSumRows;
    acc_t s = 0;
    for (int64_t i = c * kSumRows; i < end; ++i) {
      const int64_t idx = i * h + j;
      acc_t g;
      const acc_t av = math::gelu_and_grad<acc_t>(static_cast<acc_t>(a[idx]) + bj, kTanh, &g);
      const acc_t dv = g * static_cast<acc_t>(du[idx]);
      a[idx] = static_cast<T>(av);
      du[idx] = static_cast<T>(dv);
      s += dv;
    }
    partial[c * h + j] = s;
  }
}

// out[j] = Σ_c partial[c, j] for c = 0, 1, ... in order.
template <typename acc_t>
__global__ void column_sum_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t chunks,
                                  int64_t h) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= h) return;
  acc_t s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * h + j];
  out[j] = s;
}

// out[row, j] = gelu(m[row, j] + b[j]) over (rows, h) (b may be nullptr); out may be m (in place). M is T or acc_t.
// Rows on blockIdx.y, columns on blockIdx.x/threadIdx.x (grid-stride both): no per-element 64-bit i % h.
template <typename T, typename M, bool kTanh>
__global__ void bias_gelu_rows_kernel(const M* m, const acc_type<T>* __restrict__ b, T* out, int64_t rows, int64_t h) {
  using acc_t = acc_type<T>;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < h; j += col_step) {
      const acc_t u = static_cast<acc_t>(m[row * h + j]) + (b != nullptr ? b[j] : acc_t(0));
      out[row * h + j] = static_cast<T>(math::gelu<acc_t>(u, kTanh));
    }
  }
}

// A (columns, rows) grid for rows_kernel launches: enough column blocks for h, rows grid-strided beyond 65535 blocks.
inline dim3 rows_grid(int64_t rows, int64_t h) {
  const unsigned gx = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((h + kThreads - 1) / kThreads, 1024)));
  return dim3(gx, static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, 65535))));
}

// out[i] = m[i] * gelu'(u[i]); out may be m (in place). M is T or acc_t.
template <typename T, typename M, bool kTanh>
__global__ void dgelu_mul_kernel(const M* m, const T* __restrict__ u, T* out, int64_t numel) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = static_cast<T>(static_cast<acc_t>(m[i]) * math::gelu_grad<acc_t>(static_cast<acc_t>(u[i]), kTanh));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_recompute_cuda(host::FfnRecomputeInputs& in,
                                                                  const at::Tensor& w1, const at::Tensor& dy,
                                                                  const at::Tensor& w2) {
  const int64_t n = in.n, d = in.d, h = in.h;
  const auto dt = in.dt, acc = in.acc;
  const at::Tensor &xc = in.xc, &mc = in.mc, &rc = in.rc, &wc = in.wc, &bc = in.bc, &b1c = in.b1c, &y = in.y;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (n > 0 && d > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "ffn_recompute_kernel", [&] {
      using acc_t = acc_type<scalar_t>;
      auto run = [&](const auto* xp) {
        using X = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
        ln_apply_kernel<scalar_t, X><<<static_cast<unsigned>(n), row_threads(d, 1), 0, stream>>>(
            xp, mc.const_data_ptr<acc_t>(), rc.const_data_ptr<acc_t>(), wc.const_data_ptr<acc_t>(),
            bc.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(), d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      xc.scalar_type() == dt ? run(xc.const_data_ptr<scalar_t>()) : run(xc.const_data_ptr<acc_t>());
    });
  }
  auto [a, du] = host::ffn_gemms(in, w1, dy, w2);
  const int64_t chunks = (n + kSumRows - 1) / kSumRows;
  at::Tensor partial = at::empty({std::max<int64_t>(chunks, 1), h}, dy.options().dtype(acc));
  at::Tensor db1 = at::empty({h}, dy.options().dtype(acc));
  if (h > 0) {
    TORCH_INTERNAL_ASSERT(a.is_contiguous() && du.is_contiguous());
    const unsigned col_blocks = static_cast<unsigned>((h + kThreads - 1) / kThreads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "ffn_recompute_kernel", [&] {
      using acc_t = acc_type<scalar_t>;
      if (n > 0) {
        with_form(in.tanh_form, [&](auto tanh_tag) {
          constexpr bool kTanh = decltype(tanh_tag)::value;
          const dim3 grid(col_blocks, static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
          ffn_epilogue_kernel<scalar_t, kTanh><<<grid, kThreads, 0, stream>>>(
              a.mutable_data_ptr<scalar_t>(), b1c.const_data_ptr<acc_t>(), du.mutable_data_ptr<scalar_t>(),
              partial.mutable_data_ptr<acc_t>(), n, h, chunks);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      column_sum_kernel<acc_t><<<col_blocks, kThreads, 0, stream>>>(partial.const_data_ptr<acc_t>(),
                                                                     db1.mutable_data_ptr<acc_t>(), chunks, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {a, du, db1};
}

at::Tensor linear_bias_gelu_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                 c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  const bool has_bias = host::check_linear_bias_gelu(x, w, b);
  const int64_t h = w.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const host::PointwisePass pass = host::linear_bias_gelu_gemm(x, w);
  const at::Tensor bc = has_bias ? as_contig(*b, acc_dtype(x.scalar_type())) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = pass.out.size(0);
  host::run_pointwise(pass, tanh_form, [&](const auto* mp, auto* op, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(op)>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(mp)>>;
    const acc_type<T>* bp = has_bias ? bc.const_data_ptr<acc_type<T>>() : nullptr;
    bias_gelu_rows_kernel<T, M, decltype(tanh_tag)::value><<<rows_grid(rows, h), kThreads, 0, stream>>>(mp, bp, op,
                                                                                                     rows, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return pass.out;
}

void gelu_bwd_pass_cuda(const host::PointwisePass& pass, const at::Tensor& uc, bool tanh_form) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t numel = uc.numel();
  host::run_pointwise(pass, tanh_form, [&](const auto* mp, auto* op, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(op)>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(mp)>>;
    dgelu_mul_kernel<T, M, decltype(tanh_tag)::value><<<flat_grid(numel, kThreads), kThreads, 0, stream>>>(
        mp, uc.const_data_ptr<T>(), op, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void gelu_pass_cuda(const host::PointwisePass& pass, bool tanh_form) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t numel = pass.m.numel();
  host::run_pointwise(pass, tanh_form, [&](const auto* up, auto* ap, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(ap)>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(up)>>;  // T (u is read as it is)
    bias_gelu_rows_kernel<T, M, decltype(tanh_tag)::value><<<rows_grid(1, numel), kThreads, 0, stream>>>(
        up, static_cast<const acc_type<T>*>(nullptr), ap, 1, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("ffn_recompute_kernel", &host::ffn_recompute<&ffn_recompute_cuda, c10::cuda::CUDAGuard>);
  m.impl("linear_bias_gelu_kernel", &linear_bias_gelu_cuda);
  m.impl("linear_gelu_bwd_kernel", &host::linear_gelu_bwd<&gelu_bwd_pass_cuda, c10::cuda::CUDAGuard>);
  m.impl("gelu_linear_wgrad_kernel", &host::gelu_linear_wgrad<&gelu_pass_cuda, c10::cuda::CUDAGuard>);
}

}  // namespace cuda
}  // namespace ckpt_ext
