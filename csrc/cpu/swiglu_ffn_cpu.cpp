// The matmul-fused SwiGLU ops on CPU (reference.linear_swiglu / swiglu_linear_bwd / swiglu_linear_wgrad /
// swiglu_ffn_recompute). CPU GEMMs have no epilogue hook, so each op is at::mm GEMMs (MKL) plus ONE vectorized
// row-parallel pass (gated_rows.h) that does all the pointwise work around them.
//
// GEMMs whose result the contract keeps in fp32 (g, u, dH: "never rounded") run on operands widened exactly to
// acc_t = fp32 (fp64 for fp64) and return acc_t (host::mm_acc); on CPUs without bf16 dot units this is also the
// fastest GEMM MKL has for 16-bit inputs. The gate and up GEMMs write the two halves of one (N, 2F) acc_t buffer
// (at::mm_out into column views), so the epilogue reads g and u of a row from one stream; no weight concatenation is
// ever made.
//
// linear_swiglu_kernel(x (N, K), w_gate (F, K), b_gate?, w_up (F, K), b_up?) -> h (N, F) in x.dtype
//   gu = [x w_gateᵀ | x w_upᵀ] (N, 2F) acc_t;  h = silu(g + b_gate) (u + b_up)
// swiglu_linear_bwd_kernel(dy (N, d), w_down (d, F), g (N, F), u (N, F)) -> dg in g.dtype, du in u.dtype
//   dH = dy w_down (N, F) acc_t;  dg, du from dH, g, u (dg overwrites dH in place when g is fp32/fp64)
// swiglu_linear_wgrad_kernel(dy (N, d), g, u) -> dW_down = dyᵀ h (d, F) in dy.dtype
//   h = swiglu(g, u) rounded to g.dtype, kept as acc_t values; one acc_t GEMM; the result cast once to dy.dtype
// swiglu_ffn_recompute_kernel(x1 (N, d), rstd (N,), norm_w (d,), w_gate, b_gate?, w_up, b_up?, dy (N, d),
//                             w_down (d, F)) -> h, dg, du (N, F) in dy.dtype
//   1. n = norm_w * (x1 rstd rounded to x1.dtype), rounded to promote(x1, norm_w) then to dy.dtype (the forward's y
//      cast to the GEMM dtype), kept as acc_t values (N, d)
//   2. gu = [n w_gateᵀ | n w_upᵀ] (N, 2F), dH = dy w_down (N, F), all acc_t
//   3. epilogue per row: g += b_gate, u += b_up; h, dg, du in dy.dtype (dg over dH in place when dy is fp32/fp64)
// Weights are read through their strides (transposed views are fine). Outputs are always fresh tensors.
#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/llama_host.h"
#include "gated_rows.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

using host::mm_acc;
using Silu = math::SiluGate;

at::Tensor bias_or_none(const std::optional<at::Tensor>& b, at::ScalarType acc) {
  return host::defined(b) ? as_contig(*b, acc) : at::Tensor();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// [a w_gateᵀ | a w_upᵀ] (N, 2F) in acc: two GEMMs into the halves of one buffer.
at::Tensor gate_up_gemm(const at::Tensor& a, const at::Tensor& w_gate, const at::Tensor& w_up, at::ScalarType acc) {
  const int64_t n = a.size(0), f = w_gate.size(0);
  at::Tensor gu = at::empty({n, 2 * f}, a.options().dtype(acc));
  if (n == 0 || f == 0) return gu;
  const at::Tensor aa = a.to(acc);
  at::Tensor g = gu.narrow(1, 0, f), u = gu.narrow(1, f, f);
  at::mm_out(g, aa, w_gate.to(acc).t());
  at::mm_out(u, aa, w_up.to(acc).t());
  return gu;
}

at::Tensor linear_swiglu_cpu(const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
                             const at::Tensor& w_up, const std::optional<at::Tensor>& b_up) {
  host::check_linear_swiglu(x, w_gate, b_gate, w_up, b_up);
  const int64_t n = x.size(0), f = w_gate.size(0);
  const auto dt = x.scalar_type(), acc = acc_dtype(dt);
  const at::Tensor gu = gate_up_gemm(x, w_gate, w_up, acc);
  const at::Tensor bg = bias_or_none(b_gate, acc), bu = bias_or_none(b_up, acc);
  at::Tensor h = at::empty({n, f}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "linear_swiglu_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* gp = gu.const_data_ptr<acc_t>();
    const acc_t *bgp = ptr_or_null<acc_t>(bg), *bup = ptr_or_null<acc_t>(bu);
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(f), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        gated_fwd_range<Silu, scalar_t, acc_t, acc_t, scalar_t>(gp + i * 2 * f, gp + i * 2 * f + f, bgp, bup,
                                                                hp + i * f, f);
      }
    });
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_linear_bwd_cpu(const at::Tensor& dy, const at::Tensor& w_down,
                                                         const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu_linear_bwd(dy, w_down, g, u);
  const auto dt = g.scalar_type(), acc = acc_dtype(dt);
  at::Tensor dh = mm_acc(dy, w_down, acc).contiguous();  // (N, F) acc_t, fresh
  const at::Tensor gc = g.contiguous(), uc = host::same_or_acc(u, dt);
  at::Tensor dg = dt == acc ? dh : at::empty(g.sizes(), gc.options());
  at::Tensor du = at::empty(u.sizes(), gc.options().dtype(uc.scalar_type()));
  const int64_t numel = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "swiglu_linear_bwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* dhp = dh.const_data_ptr<acc_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto* up) {
      using U = std::remove_cv_t<std::remove_pointer_t<decltype(up)>>;
      U* dup = du.mutable_data_ptr<U>();
      at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
        gated_bwd_range<Silu, acc_t, scalar_t, U, scalar_t, U>(dhp + begin, gp + begin, up + begin, nullptr, nullptr,
                                                               dgp + begin, dup + begin, nullptr, end - begin);
      });
    };
    uc.scalar_type() == dt ? run(uc.const_data_ptr<scalar_t>()) : run(uc.const_data_ptr<acc_t>());
  });
  return {dg, du.scalar_type() == u.scalar_type() ? du : du.to(u.scalar_type())};
}

at::Tensor swiglu_linear_wgrad_cpu(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu_linear_wgrad(dy, g, u);
  const auto dt = g.scalar_type(), acc = acc_dtype(dt);
  const at::Tensor gc = g.contiguous(), uc = host::same_or_acc(u, dt);
  at::Tensor h = at::empty(g.sizes(), gc.options().dtype(acc));  // h rounded to g.dtype, held as acc_t values
  const int64_t numel = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "swiglu_linear_wgrad_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    acc_t* hp = h.mutable_data_ptr<acc_t>();
    auto run = [&](const auto* up) {
      using U = std::remove_cv_t<std::remove_pointer_t<decltype(up)>>;
      at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
        gated_fwd_range<Silu, scalar_t, scalar_t, U, acc_t>(gp + begin, up + begin, nullptr, nullptr, hp + begin,
                                                            end - begin);
      });
    };
    uc.scalar_type() == dt ? run(uc.const_data_ptr<scalar_t>()) : run(uc.const_data_ptr<acc_t>());
  });
  const auto wacc = acc_dtype(c10::promoteTypes(dy.scalar_type(), dt));
  return at::mm(dy.t().to(wacc), h.to(wacc)).to(dy.scalar_type());
}

// Rows [begin, end) of n (acc_t): w * (x rstd rounded to X), rounded to out_dtype, then to gemm_dtype.
template <typename X, typename acc_t>
void rms_prologue_rows(const X* x, const acc_type<X>* rstd, const acc_type<X>* w, acc_t* out, int64_t d,
                       at::ScalarType out_dtype, at::ScalarType gemm_dtype, int64_t begin, int64_t end) {
  using xacc_t = acc_type<X>;
  for (int64_t i = begin; i < end; ++i) {
    const X* xr = x + i * d;
    acc_t* nr = out + i * d;
    int64_t j = 0;
    if constexpr (kVectorized<X> && kVectorized<acc_t>) {
      const Vec vr(rstd[i]);
      for (; j + kW <= d; j += kW) {
        const Vec y = round_as(Vec::loadu(w + j) * round_to<X>(load_f(xr + j) * vr), out_dtype);
        round_as(y, gemm_dtype).store(nr + j);
      }
    }
    for (; j < d; ++j) {
      const xacc_t nv = static_cast<xacc_t>(static_cast<X>(static_cast<xacc_t>(xr[j]) * rstd[i]));
      nr[j] = static_cast<acc_t>(round_as(round_as(w[j] * nv, out_dtype), gemm_dtype));
    }
  }
}

// n (N, d) acc_t = the RMSNorm output rebuilt from x1 and rstd, rounded to promote(x1, norm_w) (the forward's y) and
// then to gemm_dtype (dy's).
at::Tensor rms_norm_prologue(const at::Tensor& x1, const at::Tensor& rstd, const at::Tensor& norm_weight,
                             at::ScalarType gemm_dtype) {
  const int64_t n = x1.size(0), d = x1.size(1);
  const auto xt = x1.scalar_type(), xacc = acc_dtype(xt), acc = acc_dtype(gemm_dtype);
  const auto out_dtype = c10::promoteTypes(xt, norm_weight.scalar_type());
  const at::Tensor xc = x1.contiguous(), r = as_contig(rstd, xacc), w = as_contig(norm_weight, xacc);
  at::Tensor na = at::empty({n, d}, xc.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "swiglu_ffn_recompute_kernel", [&] {
    using X = scalar_t;
    const X* xp = xc.const_data_ptr<X>();
    const acc_type<X>*rp = r.const_data_ptr<acc_type<X>>(), *wp = w.const_data_ptr<acc_type<X>>();
    auto run = [&](auto* np) {
      using A = std::remove_pointer_t<decltype(np)>;
      at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
        rms_prologue_rows<X, A>(xp, rp, wp, np, d, out_dtype, gemm_dtype, begin, end);
      });
    };
    acc == at::kDouble ? run(na.mutable_data_ptr<double>()) : run(na.mutable_data_ptr<float>());
  });
  return na;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_ffn_recompute_cpu(
    const at::Tensor& x1, const at::Tensor& rstd, const at::Tensor& norm_weight, const at::Tensor& w_gate,
    const std::optional<at::Tensor>& b_gate, const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
    const at::Tensor& dy, const at::Tensor& w_down) {
  host::check_swiglu_ffn_recompute(x1, rstd, norm_weight, w_gate, b_gate, w_up, b_up, dy, w_down);
  const int64_t n = x1.size(0), f = w_gate.size(0);
  const auto dt = dy.scalar_type(), acc = acc_dtype(dt);
  at::Tensor gu = gate_up_gemm(rms_norm_prologue(x1, rstd, norm_weight, dt), w_gate, w_up, acc);  // (N, 2F)
  at::Tensor dh = mm_acc(dy, w_down, acc).contiguous();                                            // (N, F)
  const at::Tensor bg = bias_or_none(b_gate, acc), bu = bias_or_none(b_up, acc);
  const auto contiguous = dy.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor h = at::empty({n, f}, contiguous), du = at::empty({n, f}, contiguous);
  at::Tensor dg = dt == acc ? dh : at::empty({n, f}, contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "swiglu_ffn_recompute_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t *gp = gu.const_data_ptr<acc_t>(), *dhp = dh.const_data_ptr<acc_t>();
    const acc_t *bgp = ptr_or_null<acc_t>(bg), *bup = ptr_or_null<acc_t>(bu);
    scalar_t *hp = h.mutable_data_ptr<scalar_t>(), *dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dup = du.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(f), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* gr = gp + i * 2 * f;
        gated_bwd_range<Silu, acc_t, acc_t, acc_t, scalar_t, scalar_t>(dhp + i * f, gr, gr + f, bgp, bup, dgp + i * f,
                                                                       dup + i * f, hp + i * f, f);
      }
    });
  });
  return {h, dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("linear_swiglu_kernel", &linear_swiglu_cpu);
  m.impl("swiglu_linear_bwd_kernel", &swiglu_linear_bwd_cpu);
  m.impl("swiglu_linear_wgrad_kernel", &swiglu_linear_wgrad_cpu);
  m.impl("swiglu_ffn_recompute_kernel", &swiglu_ffn_recompute_cpu);
}

}  // namespace cpu
}  // namespace ckpt_ext
