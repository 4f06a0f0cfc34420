// The gated-MLP pointwise ops on CPU, h = gate(g) u: SwiGLU (gate = silu, reference.swiglu_fwd / swiglu_bwd, Llama)
// and GeGLU (gate = tanh-form gelu, reference.geglu_fwd / geglu_bwd, Gemma / ModernBERT). fp32 math (fp64 for fp64 g).
//
// {swiglu,geglu}_fwd_kernel(g (N, F), u (N, F))  -> h = gate(g) u (N, F) in g.dtype
// {swiglu,geglu}_bwd_kernel(dh (N, F), g, u)      -> dg = dh u gate'(g) in g.dtype, du = dh gate(g) in u.dtype
// One implementation templated on the op (host::SwigluOp / GegluOp, llama_host.h: its gate, math::SiluGate /
// GeluTanhGate, and its names): one flat pass over the contiguous tensors (gated_rows.h), at::parallel_for over
// fixed-size chunks. Operands in g's dtype T are read as they are, any other dtype is widened once to acc_t; du is
// written as u's dtype when that is T, else as acc_t and cast once. Outputs are always fresh tensors.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../common/llama_host.h"
#include "gated_rows.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

constexpr int64_t kFlatGrain = 1 << 14;

template <typename Op>
at::Tensor gated_fwd(const at::Tensor& g, const at::Tensor& u) {
  using Gate = typename Op::Gate;
  host::check_swiglu(Op::kFwd, g, u);
  const auto dt = g.scalar_type();
  const at::Tensor gc = g.contiguous(), uc = host::same_or_acc(u, dt);
  at::Tensor h = at::empty(g.sizes(), gc.options());
  const int64_t numel = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, Op::kFwd, [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto* up) {
      using U = std::remove_cv_t<std::remove_pointer_t<decltype(up)>>;
      at::parallel_for(0, numel, kFlatGrain, [&](int64_t begin, int64_t end) {
        gated_fwd_range<Gate, scalar_t, scalar_t, U, scalar_t>(gp + begin, up + begin, nullptr, nullptr, hp + begin,
                                                               end - begin);
      });
    };
    uc.scalar_type() == dt ? run(uc.const_data_ptr<scalar_t>()) : run(uc.const_data_ptr<acc_t>());
  });
  return h;
}

template <typename Op>
std::tuple<at::Tensor, at::Tensor> gated_bwd(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  using Gate = typename Op::Gate;
  host::check_gated_bwd<Op>(dh, g, u);
  const auto dt = g.scalar_type();
  const at::Tensor gc = g.contiguous(), uc = host::same_or_acc(u, dt), dhc = host::same_or_acc(dh, dt);
  at::Tensor dg = at::empty(g.sizes(), gc.options());
  at::Tensor du = at::empty(u.sizes(), gc.options().dtype(uc.scalar_type()));  // u's dtype when it is T, else acc_t
  const int64_t numel = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, Op::kBwd, [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto* dhp, const auto* up) {
      using D = std::remove_cv_t<std::remove_pointer_t<decltype(dhp)>>;
      using U = std::remove_cv_t<std::remove_pointer_t<decltype(up)>>;
      U* dup = du.mutable_data_ptr<U>();
      at::parallel_for(0, numel, kFlatGrain, [&](int64_t begin, int64_t end) {
        gated_bwd_range<Gate, D, scalar_t, U, scalar_t, U>(dhp + begin, gp + begin, up + begin, nullptr, nullptr,
                                                           dgp + begin, dup + begin, nullptr, end - begin);
      });
    };
    auto with_u = [&](const auto* dhp) {
      uc.scalar_type() == dt ? run(dhp, uc.const_data_ptr<scalar_t>()) : run(dhp, uc.const_data_ptr<acc_t>());
    };
    dhc.scalar_type() == dt ? with_u(dhc.const_data_ptr<scalar_t>()) : with_u(dhc.const_data_ptr<acc_t>());
  });
  return {dg, du.scalar_type() == u.scalar_type() ? du : du.to(u.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("swiglu_fwd_kernel", &gated_fwd<host::SwigluOp>);
  m.impl("swiglu_bwd_kernel", &gated_bwd<host::SwigluOp>);
  m.impl("geglu_fwd_kernel", &gated_fwd<host::GegluOp>);
  m.impl("geglu_bwd_kernel", &gated_bwd<host::GegluOp>);
}

}  // namespace cpu
}  // namespace ckpt_ext
