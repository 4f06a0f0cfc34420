// GeGLU forward and backward on CPU (reference.geglu_fwd / geglu_bwd: the Gemma / ModernBERT MLP), fp32 math (fp64
// for fp64 g).
//
// geglu_fwd_kernel(g (N, F), u (N, F))      -> h = gelu_tanh(g) u (N, F) in g.dtype
// geglu_bwd_kernel(dh (N, F), g, u)          -> dg = dh u gelu_tanh'(g) in g.dtype, du = dh gelu_tanh(g) in u.dtype
// One flat pass over the contiguous tensors (geglu_rows.h, the tanh-form GELU of gelu_vec.h on Vectorized<float>),
// at::parallel_for over fixed-size chunks. Operands in g's dtype T are read as they are, any other dtype is widened
// once to acc_t; du is written as u's dtype when that is T, else as acc_t and cast once. Outputs are fresh tensors.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../common/llama_host.h"
#include "geglu_rows.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

constexpr int64_t kFlatGrain = 1 << 14;

at::Tensor geglu_fwd_cpu(const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu("geglu_fwd_kernel", g, u);
  const auto dt = g.scalar_type();
  const at::Tensor gc = g.contiguous(), uc = host::same_or_acc(u, dt);
  at::Tensor h = at::empty(g.sizes(), gc.options());
  const int64_t numel = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "geglu_fwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto* up) {
      at::parallel_for(0, numel, kFlatGrain, [&](int64_t begin, int64_t end) {
        geglu_fwd_range(gp + begin, up + begin, hp + begin, end - begin);
      });
    };
    uc.scalar_type() == dt ? run(uc.const_data_ptr<scalar_t>()) : run(uc.const_data_ptr<acc_t>());
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> geglu_bwd_cpu(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu("geglu_bwd_kernel", g, u);
  TORCH_CHECK(dh.sizes() == g.sizes(), "geglu_bwd_kernel: dh must be (N, F) like g, got ", dh.sizes());
  const auto dt = g.scalar_type();
  const at::Tensor gc = g.contiguous(), uc = host::same_or_acc(u, dt), dhc = host::same_or_acc(dh, dt);
  at::Tensor dg = at::empty(g.sizes(), gc.options());
  at::Tensor du = at::empty(u.sizes(), gc.options().dtype(uc.scalar_type()));  // u's dtype when it is T, else acc_t
  const int64_t numel = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "geglu_bwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto* dhp, const auto* up) {
      using U = std::remove_cv_t<std::remove_pointer_t<decltype(up)>>;
      U* dup = du.mutable_data_ptr<U>();
      at::parallel_for(0, numel, kFlatGrain, [&](int64_t begin, int64_t end) {
        geglu_bwd_range(dhp + begin, gp + begin, up + begin, dgp + begin, dup + begin, end - begin);
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
  m.impl("geglu_fwd_kernel", &geglu_fwd_cpu);
  m.impl("geglu_bwd_kernel", &geglu_bwd_cpu);
}

}  // namespace cpu
}  // namespace ckpt_ext
