// SwiGLU on CUDA fused with the matmuls around it (reference.linear_swiglu / swiglu_linear_bwd / swiglu_linear_wgrad /
// swiglu_ffn_recompute); the plain swiglu_fwd/bwd_kernel are gated_cuda.cu's. Math: csrc/common/ckpt_math.h
// (math::gated / gated_and_grad on math::SiluGate; fp32, fp64 for fp64).
//
// The matmul-fused ops are aten GEMMs (cuBLAS) plus ONE fused pointwise kernel, not GEMM epilogues: g, u and dH come
// from host::mm_acc (csrc/common/llama_host.h: cuBLAS with an fp32 output for 16-bit operands, so they are never
// rounded) as separate (N, F) fp32 buffers, and swiglu_rows_kernel reads them and writes only the op's outputs.
//   linear_swiglu        g = x w_gateᵀ, u = x w_upᵀ              -> h = silu(g + b_gate) (u + b_up)     in x.dtype
//   swiglu_linear_bwd    dH = dy w_down                          -> dg, du (from dH, g, u)              in g/u dtype
//   swiglu_linear_wgrad  h = swiglu(g, u) in g.dtype (swiglu_fwd's kernel), then aten mm dyᵀ h        in dy.dtype
//   swiglu_ffn_recompute n = the RMSNorm output (rms_apply_kernel, in dy.dtype), g, u = n w_*ᵀ, dH = dy w_down
//                                                                -> h, dg, du                            in dy.dtype
// swiglu_rows_kernel runs over (rows, F) with rows on blockIdx.y and columns on x (grid-stride both): the bias index
// is the column, no per-element i % F. Outputs are fresh tensors.
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/ckpt_math.h"
#include "../common/ffn_host.h"
#include "../common/llama_host.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {

at::Tensor swiglu_fwd_cuda(const at::Tensor& g, const at::Tensor& u);  // gated_cuda.cu: swiglu_fwd_kernel

namespace {

constexpr int kThreads = 256;

inline dim3 rows_grid(int64_t rows, int64_t f) {
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>((f + kThreads - 1) / kThreads, 1024));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, 65535))));
}

// Over (rows, f): g, u (row stride f, storage G) plus the optional acc_t biases; with dh (acc_t, or nullptr for the
// forward) writes dg, du and h when given, else h only. Outputs in T.
template <typename T, typename G>
__global__ void swiglu_rows_kernel(const acc_type<T>* __restrict__ dh, const G* __restrict__ g,
                                   const G* __restrict__ u, const acc_type<T>* __restrict__ bg,
                                   const acc_type<T>* __restrict__ bu, T* __restrict__ h, T* __restrict__ dg,
                                   T* __restrict__ du, int64_t rows, int64_t f) {
  using acc_t = acc_type<T>;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < f; j += col_step) {
      const int64_t i = row * f + j;
      const acc_t gv = static_cast<acc_t>(g[i]) + (bg ? bg[j] : acc_t(0));
      const acc_t uv = static_cast<acc_t>(u[i]) + (bu ? bu[j] : acc_t(0));
      if (dh == nullptr) {
        h[i] = static_cast<T>(math::gated<math::SiluGate, acc_t>(gv, uv));
        continue;
      }
      acc_t dgv, duv;
      const acc_t hv = math::gated_and_grad<math::SiluGate, acc_t>(dh[i], gv, uv, &dgv, &duv);
      dg[i] = static_cast<T>(dgv);
      du[i] = static_cast<T>(duv);
      if (h != nullptr) h[i] = static_cast<T>(hv);
    }
  }
}

// n (N, d) = the RMSNorm output rebuilt from x and rstd: w * (x rstd rounded to X), rounded to out_dtype's
// precision (round_code: 1 bf16, 2 fp16, 3 fp32, 0 none), stored as N_t. One block per row.
template <typename X, typename N_t>
__global__ void rms_apply_kernel(const X* __restrict__ x, const acc_type<X>* __restrict__ rstd,
                                 const acc_type<X>* __restrict__ w, N_t* __restrict__ out, int64_t d, int round_code) {
  using acc_t = acc_type<X>;
  const int64_t row = blockIdx.x;
  const acc_t r = rstd[row];
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    acc_t v = w[j] * static_cast<acc_t>(static_cast<X>(static_cast<acc_t>(x[row * d + j]) * r));
    if (round_code == 1) v = static_cast<acc_t>(static_cast<c10::BFloat16>(v));
    if (round_code == 2) v = static_cast<acc_t>(static_cast<c10::Half>(v));
    if (round_code == 3) v = static_cast<acc_t>(static_cast<float>(v));
    out[row * d + j] = static_cast<N_t>(v);
  }
}

int round_code(at::ScalarType dt) {
  switch (dt) {
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    case at::kFloat:
      return 3;
    default:
      return 0;
  }
}

at::Tensor bias_or_none(const std::optional<at::Tensor>& b, at::ScalarType acc) {
  return host::defined(b) ? as_contig(*b, acc) : at::Tensor();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// The fused pointwise pass over (rows, f) in T = out dtype: g/u of storage G; dh, biases acc_t or undefined.
template <typename T, typename G>
void launch_rows(const at::Tensor& dh, const G* g, const G* u, const at::Tensor& bg, const at::Tensor& bu, T* h, T* dg,
                 T* du, int64_t rows, int64_t f) {
  using acc_t = acc_type<T>;
  if (rows == 0 || f == 0) return;
  swiglu_rows_kernel<T, G><<<rows_grid(rows, f), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ptr_or_null<acc_t>(dh), g, u, ptr_or_null<acc_t>(bg), ptr_or_null<acc_t>(bu), h, dg, du, rows, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor linear_swiglu_cuda(const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
                              const at::Tensor& w_up, const std::optional<at::Tensor>& b_up) {
  host::check_linear_swiglu(x, w_gate, b_gate, w_up, b_up);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), f = w_gate.size(0);
  const auto dt = x.scalar_type(), acc = acc_dtype(dt);
  const at::Tensor g = host::mm_acc(x, w_gate.t(), acc).contiguous(), u = host::mm_acc(x, w_up.t(), acc).contiguous();
  const at::Tensor bg = bias_or_none(b_gate, acc), bu = bias_or_none(b_up, acc);
  at::Tensor h = at::empty({n, f}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "linear_swiglu_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_rows<scalar_t, acc_t>(at::Tensor(), g.const_data_ptr<acc_t>(), u.const_data_ptr<acc_t>(), bg, bu,
                                 h.mutable_data_ptr<scalar_t>(), nullptr, nullptr, n, f);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_linear_bwd_cuda(const at::Tensor& dy, const at::Tensor& w_down,
                                                          const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu_linear_bwd(dy, w_down, g, u);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.size(0), f = g.size(1);
  const auto dt = g.scalar_type(), acc = acc_dtype(dt);
  const at::Tensor dh = host::mm_acc(dy, w_down, acc).contiguous();  // (N, F) acc_t
  const auto ct = u.scalar_type() == dt ? dt : acc;
  const at::Tensor gc = as_contig(g, ct), uc = as_contig(u, ct);
  at::Tensor dg = at::empty({n, f}, gc.options()), du = at::empty({n, f}, gc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ct, "swiglu_linear_bwd_kernel", [&] {
    launch_rows<scalar_t, scalar_t>(dh, gc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(), at::Tensor(),
                                    at::Tensor(), nullptr, dg.mutable_data_ptr<scalar_t>(),
                                    du.mutable_data_ptr<scalar_t>(), n, f);
  });
  return {dg.scalar_type() == dt ? dg : dg.to(dt), du.scalar_type() == u.scalar_type() ? du : du.to(u.scalar_type())};
}

at::Tensor swiglu_linear_wgrad_cuda(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu_linear_wgrad(dy, g, u);
  const c10::cuda::CUDAGuard guard(g.device());
  return host::gelu_linear_wgrad_mm(dy, swiglu_fwd_cuda(g, u));  // dyᵀ h in promote(dy, h), cast to dy.dtype
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_ffn_recompute_cuda(
    const at::Tensor& x1, const at::Tensor& rstd, const at::Tensor& norm_weight, const at::Tensor& w_gate,
    const std::optional<at::Tensor>& b_gate, const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
    const at::Tensor& dy, const at::Tensor& w_down) {
  host::check_swiglu_ffn_recompute(x1, rstd, norm_weight, w_gate, b_gate, w_up, b_up, dy, w_down);
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t n = x1.size(0), d = x1.size(1), f = w_gate.size(0);
  const auto dt = dy.scalar_type(), acc = acc_dtype(dt), xt = x1.scalar_type(), xacc = acc_dtype(xt);
  const auto out_dtype = c10::promoteTypes(xt, norm_weight.scalar_type());
  const at::Tensor xc = x1.contiguous(), r = as_contig(rstd, xacc), nw = as_contig(norm_weight, xacc);
  // n in dy.dtype when that is x1's, else in x1's acc_t and then cast (rounded) to dy.dtype.
  at::Tensor nrm = at::empty({n, d}, xc.options().dtype(dt == xt ? xt : xacc));
  if (n > 0 && d > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "swiglu_ffn_recompute_kernel", [&] {
      using xacc_t = acc_type<scalar_t>;
      auto launch = [&](auto* np) {
        using N_t = std::remove_pointer_t<decltype(np)>;
        rms_apply_kernel<scalar_t, N_t><<<static_cast<unsigned>(n), row_threads(d, 1), 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
            xc.const_data_ptr<scalar_t>(), r.const_data_ptr<xacc_t>(), nw.const_data_ptr<xacc_t>(), np, d,
            round_code(out_dtype));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      dt == xt ? launch(nrm.mutable_data_ptr<scalar_t>()) : launch(nrm.mutable_data_ptr<xacc_t>());
    });
  }
  if (nrm.scalar_type() != dt) nrm = nrm.to(dt);
  const at::Tensor g = host::mm_acc(nrm, w_gate.t(), acc).contiguous();
  const at::Tensor u = host::mm_acc(nrm, w_up.t(), acc).contiguous();
  nrm.reset();
  const at::Tensor dh = host::mm_acc(dy, w_down, acc).contiguous();
  const at::Tensor bg = bias_or_none(b_gate, acc), bu = bias_or_none(b_up, acc);
  const auto contiguous = dy.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor h = at::empty({n, f}, contiguous), dg = at::empty({n, f}, contiguous), du = at::empty({n, f}, contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "swiglu_ffn_recompute_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_rows<scalar_t, acc_t>(dh, g.const_data_ptr<acc_t>(), u.const_data_ptr<acc_t>(), bg, bu,
                                 h.mutable_data_ptr<scalar_t>(), dg.mutable_data_ptr<scalar_t>(),
                                 du.mutable_data_ptr<scalar_t>(), n, f);
  });
  return {h, dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("linear_swiglu_kernel", &linear_swiglu_cuda);
  m.impl("swiglu_linear_bwd_kernel", &swiglu_linear_bwd_cuda);
  m.impl("swiglu_linear_wgrad_kernel", &swiglu_linear_wgrad_cuda);
  m.impl("swiglu_ffn_recompute_kernel", &swiglu_ffn_recompute_cuda);
}

}  // namespace cuda
}  // namespace ckpt_ext
