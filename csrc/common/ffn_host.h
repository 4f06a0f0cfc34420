// Host side of the FFN's GELU ops, shared by the CPU (csrc/cpu/gelu_cpu.cpp, ffn_cpu.cpp) and CUDA (csrc/cuda/
// gelu_cuda.cu, ffn_cuda.cu) kernels: argument checks, any GEMM (at::mm on either device), dtype choices and output
// buffers are decided here once; each backend supplies only its pointwise pass (a row-parallel CPU loop, a CUDA kernel
// launch) as a callback of run_pointwise.
//
//   bias_gelu_args(x (..., H), bias (H,)?)      m = x contiguous, out fresh like x; bias in fp32 (fp64 for fp64)
//   gelu_bwd_args(da, u)                        m = da (widened to fp32 unless it has u's dtype), out fresh like u
//   linear_bias_gelu_gemm(x (N, K), w (H, K))   m = x @ wᵀ in promote(x, w), brought to fp32 when that is neither
//                                               x's dtype nor fp32; out = m (in place) when m has x's dtype
//   linear_gelu_bwd_gemm(dy (N, d), w2 (d, H), u (N, H))
//                                               m = dy @ w2 in promote(dy, w2), widened to fp32 unless it is u's
//                                               dtype; out = m (in place) when m has u's dtype
//   gelu_linear_wgrad_mm(dy (N, d), a (N, H))   dyᵀ @ a in promote(dy, a), returned in dy's dtype
//   run_pointwise(pass, tanh_form, f)           dispatches on out's dtype T and the GELU form and calls
//                                               f(m_ptr, out_ptr, tanh_tag): m_ptr is const T* when m has T's dtype,
//                                               else const acc_type<T>*; tanh_tag a std::bool_constant
// Host code only (no device functions); m and out are contiguous.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/ScalarType.h>

#include "host_args.h"

namespace ckpt_ext {
namespace host {

// Calls f(std::integral_constant<bool, tanh_form>) so the form is a compile-time constant of the pointwise pass.
template <typename F>
void with_form(bool tanh_form, F&& f) {
  tanh_form ? f(std::true_type{}) : f(std::false_type{});
}

// The tensor m a pointwise pass reads (a GEMM result, or an op's input) and the tensor out it writes (m itself when
// in place), both contiguous.
struct PointwisePass {
  at::Tensor m;
  at::Tensor out;
};

// bias_gelu_kernel: the pass over x (flat, or rows of H with a bias) and the bias in the compute dtype (or undefined).
struct BiasGeluArgs {
  PointwisePass pass;
  at::Tensor bias;
  int64_t h;
};

inline BiasGeluArgs bias_gelu_args(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const bool has_bias = defined(bias);
  const int64_t h = x.dim() == 0 ? 1 : x.size(-1);
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->numel() == h), "bias_gelu_kernel: bias must be (H,)");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = has_bias ? as_contig(*bias, acc_dtype(x.scalar_type())) : at::Tensor();
  return {{xc, at::empty(x.sizes(), xc.options())}, bc, h};
}

// gelu_bwd_kernel: the pass over da (u's dtype, else widened exactly to the compute dtype) and u contiguous.
struct GeluBwdArgs {
  PointwisePass pass;
  at::Tensor u;
};

inline GeluBwdArgs gelu_bwd_args(const at::Tensor& da, const at::Tensor& u) {
  TORCH_CHECK(da.sizes() == u.sizes(), "gelu_bwd_kernel: da and u must have the same shape");
  const at::Tensor uc = u.contiguous();
  const bool same = da.scalar_type() == u.scalar_type();
  const at::Tensor dac = same ? da.contiguous() : as_contig(da, acc_dtype(u.scalar_type()));
  return {{dac, at::empty(u.sizes(), uc.options())}, uc};
}

inline PointwisePass linear_bias_gelu_gemm(const at::Tensor& x, const at::Tensor& w) {
  const auto dt = x.scalar_type(), acc = acc_dtype(dt);
  const auto mm_dt = c10::promoteTypes(dt, w.scalar_type());
  at::Tensor m = at::mm(x.to(mm_dt), w.t().to(mm_dt));  // (N, H), fresh
  if (mm_dt != dt && mm_dt != acc) m = m.to(acc);
  if (!m.is_contiguous()) m = m.contiguous();
  const auto contiguous = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = m.scalar_type() == dt ? m : at::empty({x.size(0), w.size(0)}, contiguous);
  return {m, out};
}

inline PointwisePass linear_gelu_bwd_gemm(const at::Tensor& dy, const at::Tensor& w2, const at::Tensor& u) {
  const auto dt = u.scalar_type();
  const auto mm_dt = c10::promoteTypes(dy.scalar_type(), w2.scalar_type());
  at::Tensor m = at::mm(dy.to(mm_dt), w2.to(mm_dt));  // (N, H), fresh
  if (mm_dt != dt) m = m.to(acc_dtype(dt));
  if (!m.is_contiguous()) m = m.contiguous();
  at::Tensor out = mm_dt == dt ? m : at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  return {m, out};
}

inline at::Tensor gelu_linear_wgrad_mm(const at::Tensor& dy, const at::Tensor& a) {
  const auto mm_dt = c10::promoteTypes(dy.scalar_type(), a.scalar_type());
  return at::mm(dy.t().to(mm_dt), a.to(mm_dt)).to(dy.scalar_type());
}

template <typename F>
void run_pointwise(const PointwisePass& pass, bool tanh_form, F&& f) {
  if (pass.out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pass.out.scalar_type(), "ffn_pointwise_pass", [&] {
    using acc_t = acc_type<scalar_t>;
    scalar_t* op = pass.out.mutable_data_ptr<scalar_t>();
    with_form(tanh_form, [&](auto tanh_tag) {
      if (pass.m.scalar_type() == pass.out.scalar_type()) {
        f(pass.m.const_data_ptr<scalar_t>(), op, tanh_tag);
      } else {
        f(pass.m.const_data_ptr<acc_t>(), op, tanh_tag);
      }
    });
  });
}

}  // namespace host
}  // namespace ckpt_ext
