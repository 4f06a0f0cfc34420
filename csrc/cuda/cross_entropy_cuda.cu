// The LM head on CUDA for the `cuda` backend (the same chunking and rounding as csrc/cpu/cross_entropy_cpu.cpp; the
// `triton` backend runs kernels/linear_cross_entropy.py instead). ATen ops only: each chunk's GEMM is cuBLAS, the row
// passes are ATen's fused reductions and elementwise kernels. T = hidden.dtype = weight.dtype, acc_t = float (double
// for float64).
//
// linear_cross_entropy_fwd_kernel(hidden (N, d), weight (V, d), bias (V,)?, labels (N,), ignore_index, eps,
//                                 chunk_bytes) -> losses (N,) acc_t, lse (N,) acc_t
//   token chunks of r rows: z = hidden[r0:r0+r] @ weightᵀ in T (rounded as Hugging Face's lm_head output is), widened
//   to acc_t (+ bias); lse = logsumexp(z); loss = lse - (1-eps) z_y - eps mean(z), 0 where labels == ignore_index.
// linear_cross_entropy_bwd_kernel(dloss (N,), hidden, weight, bias?, labels, lse (N,), ignore_index, eps, chunk_bytes,
//                                 need_dweight) -> dhidden (N, d) T, dweight (V, d) T or (0,), dbias (V,) T or (0,)
//   vocabulary chunks of c columns: z rebuilt as in the forward; dz = g (exp(z - lse) - eps/V), dz_y -= g (1-eps)
//   where the label falls in the chunk, g = dloss (0 on ignored rows); dz rounded to T for
//   dweight[c0:c0+c] = dzᵀ @ hidden (complete per chunk: no (V, d) accumulator), dhidden += dz @ W_c (fp32 across
//   chunks), dbias[c0:c0+c] = Σ_rows dz (acc_t, before rounding).
#include <torch/library.h>

#include "../common/host_args.h"
#include "../common/lm_head_host.h"

namespace ckpt_ext {
namespace cuda {
namespace {

using host::acc_dtype;
using host::chunk_len;

// (r, c) acc_t logits of h (r, d) against w (c, d), the GEMM in T, bias added in acc_t.
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b) {
  at::Tensor z = at::mm(h, w.t()).to(acc_dtype(h.scalar_type()));
  return b.defined() ? z.add_(b) : z;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const host::FwdInputs& in, const at::Tensor& weight, int64_t ignore_index,
                                            double eps, int64_t chunk_bytes) {
  const int64_t n = in.shape.n, v = in.shape.v;
  const at::Tensor &h = in.h, &y = in.y, &b = in.b;
  at::Tensor losses = in.losses, lse = in.lse;
  const int64_t rows = chunk_len(chunk_bytes, v, h.scalar_type(), std::max<int64_t>(n, 1));
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    const at::Tensor z = chunk_logits(h.narrow(0, r0, r), weight, b);  // (r, V) acc_t
    const at::Tensor yc = y.narrow(0, r0, r), ignored = yc.eq(ignore_index);
    const at::Tensor s = at::logsumexp(z, {1});  // (r,)
    const at::Tensor zy = z.gather(1, yc.masked_fill(ignored, 0).unsqueeze(1)).squeeze(1);
    at::Tensor loss = s - zy * (1.0 - eps);
    if (eps != 0.0) loss = loss - z.mean(1) * eps;
    losses.narrow(0, r0, r).copy_(loss.masked_fill_(ignored, 0));
    lse.narrow(0, r0, r).copy_(s);
  }
  return {losses, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const host::BwdInputs& in, const at::Tensor& weight,
                                                        int64_t ignore_index, double eps, bool need_dweight) {
  const at::Tensor ignored = in.y.eq(ignore_index);
  const at::Tensor g = in.g.masked_fill(ignored, 0).unsqueeze(1);  // (N, 1)
  const at::Tensor s = in.s.unsqueeze(1);                          // (N, 1)
  at::Tensor dh_acc = at::zeros({in.shape.n, in.shape.d}, in.h.options().dtype(in.acc));
  const int64_t v = in.shape.v;
  for (int64_t c0 = 0; in.shape.n > 0 && c0 < v; c0 += in.cols) {
    const int64_t c = std::min(in.cols, v - c0);
    const at::Tensor wc = weight.narrow(0, c0, c);
    at::Tensor dz = chunk_logits(in.h, wc, in.has_bias() ? in.b.narrow(0, c0, c) : at::Tensor());  // (N, c) acc_t
    dz.sub_(s).exp_().sub_(eps / static_cast<double>(v)).mul_(g);
    const at::Tensor in_chunk = in.y.ge(c0).logical_and(in.y.lt(c0 + c)).logical_and(ignored.logical_not());
    const at::Tensor hit_rows = in_chunk.nonzero().squeeze(1);
    if (hit_rows.numel() > 0) {
      const at::Tensor cols_hit = in.y.index_select(0, hit_rows) - c0;
      const at::Tensor delta = g.squeeze(1).index_select(0, hit_rows) * (1.0 - eps);
      dz.index_put_({hit_rows, cols_hit}, delta.neg(), /*accumulate=*/true);
    }
    const at::Tensor dzt = dz.to(in.dt);
    if (need_dweight) {
      at::Tensor dw_c = in.dw.narrow(0, c0, c);
      at::mm_out(dw_c, dzt.t(), in.h);
    }
    dh_acc.add_(at::mm(dzt, wc));
    if (in.has_bias()) in.db.narrow(0, c0, c).add_(dz.sum(0));
  }
  return {dh_acc.to(in.dt), in.dw, host::dbias_out(in)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("linear_cross_entropy_fwd_kernel", &host::lce_fwd<&fwd_cuda>);
  m.impl("linear_cross_entropy_bwd_kernel", &host::lce_bwd<&bwd_cuda>);
}

}  // namespace cuda
}  // namespace ckpt_ext
