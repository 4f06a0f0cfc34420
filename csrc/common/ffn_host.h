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
//   ffn_recompute<Impl, Guard>                  the op's entry point: checks, the device guard, FfnRecomputeInputs
//                                               (x1 in dy's dtype or widened, LN stats and params and b1 in acc_t,
//                                               the LN output buffer y), then the device's Impl(in, w1, dy, w2)
//   ffn_gemms(in, w1, dy, w2)                   a = y @ w1ᵀ (u, made a in place), frees y, du = dy @ w2 (dA, made du)
//   linear_gelu_bwd<Pass, Guard> / gelu_linear_wgrad<Pass, Guard>
//                                               the two ops' entry points in schema order: checks, the device guard
//                                               (NoGuard on CPU), the GEMMs above around the device's pointwise Pass
// Host code only (no device functions); m and out are contiguous.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/ScalarType.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <utility>

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

// ffn_recompute_kernel's operands as both devices' kernels read them (see the header comment).
struct FfnRecomputeInputs {
  bool tanh_form;
  int64_t n, d, h;
  at::ScalarType dt, acc;
  at::Tensor xc, mc, rc, wc, bc, b1c;  // x1 (N, d); mean, rstd (N,); ln_weight, ln_bias (d,); b1 (H,)
  at::Tensor y;                        // (N, d) dy.dtype, contiguous: the LN output the device writes
};

// (a, du), both (N, H) in dy's dtype: the two GEMMs of the recompute on the device's LN output in.y (freed after).
inline std::pair<at::Tensor, at::Tensor> ffn_gemms(FfnRecomputeInputs& in, const at::Tensor& w1, const at::Tensor& dy,
                                                   const at::Tensor& w2) {
  at::Tensor a = at::mm(in.y, w1.t().to(in.dt));  // (N, H): u, then a in place
  in.y.reset();
  at::Tensor du = at::mm(dy, w2.to(in.dt));  // (N, H): dA, then du in place
  return {a, du};
}

// The CPU's device guard: nothing to switch.
struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

// ffn_recompute_kernel(x1, mean, rstd, ln_weight, ln_bias, w1, b1, dy, w2, approximate) -> (a, du, db1).
template <auto Impl, typename Guard>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_recompute(
    const at::Tensor& x1, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& dy, const at::Tensor& w2,
    c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  check_ffn_recompute(x1, mean, rstd, ln_weight, ln_bias, w1, b1, dy, w2);
  const int64_t n = x1.size(0), d = x1.size(1);
  const Guard guard(dy.device());
  const auto dt = dy.scalar_type(), acc = acc_dtype(dt);
  FfnRecomputeInputs in{tanh_form, n, d, w1.size(0), dt, acc};
  in.xc = x1.scalar_type() == dt ? x1.contiguous() : as_contig(x1, acc);
  in.mc = as_contig(mean, acc);
  in.rc = as_contig(rstd, acc);
  in.wc = as_contig(ln_weight, acc);
  in.bc = as_contig(ln_bias, acc);
  in.b1c = as_contig(b1, acc);
  in.y = at::empty({n, d}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  return Impl(in, w1, dy, w2);
}

// linear_gelu_bwd_kernel(dy (N, d), w2 (d, H), u (N, H), approximate) -> du = (dy @ w2) · gelu'(u): the device's
// Pass(pass, uc, tanh_form) runs the pointwise du over pass (m = dy @ w2, out) with u contiguous.
template <auto Pass, typename Guard>
at::Tensor linear_gelu_bwd(const at::Tensor& dy, const at::Tensor& w2, const at::Tensor& u,
                           c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  check_linear_gelu_bwd(dy, w2, u);
  const Guard guard(u.device());
  const at::Tensor uc = u.contiguous();
  const PointwisePass pass = linear_gelu_bwd_gemm(dy, w2, uc);
  Pass(pass, uc, tanh_form);
  return pass.out;
}

// gelu_linear_wgrad_kernel(dy (N, d), u (N, H), approximate) -> dW2 = dyᵀ @ gelu(u): the device's Pass(pass,
// tanh_form) writes a = gelu(u) from pass.m = u into pass.out.
template <auto Pass, typename Guard>
at::Tensor gelu_linear_wgrad(const at::Tensor& dy, const at::Tensor& u, c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  check_gelu_linear_wgrad(dy, u);
  const Guard guard(u.device());
  const at::Tensor uc = u.contiguous();
  const PointwisePass pass{uc, at::empty(u.sizes(), uc.options())};  // a = gelu(u), then dW2 = dyᵀ @ a
  Pass(pass, tanh_form);
  return gelu_linear_wgrad_mm(dy, pass.out);
}

}  // namespace host
}  // namespace ckpt_ext
