"""Time each Triton kernel against the torch eager ops it replaces, at a GPT-style shape, and check its output.

    python -m bench.gpu_kernels [--device cuda|cpu]

Shape (bf16): N = 8192 rows, d = 2048, H = 8192 (cpu smoke mode: N = 33, d = 72, H = 200, fp32, interpreter).
For each op: ms of the Triton launcher (backend "triton") and of the eager torch sequence, the op's FLOPs and its
minimal bytes (inputs read once + outputs written once), GB/s and TFLOP/s achieved, % of the 4.3 TB/s and 788 TF/s
ceilings, the speedup over eager and the max abs error against ckpt_ext.reference. Writes gpu_kernels.csv / .md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gpu_common import PEAK_BYTES_PER_S, PEAK_FLOPS, cli_main, time_ms


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(n: int, d: int, h: int, dtype: torch.dtype, device: str):
    """(name, triton fn, eager fn, reference fn, flops, bytes) per op."""
    from ckpt_ext import reference as R
    from ckpt_ext.backends.triton import launchers as L

    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)
    x, dy, res = rnd(n, d), rnd(n, d), rnd(n, d)
    w, b = rnd(d, scale=0.1) + 1, rnd(d, scale=0.1)
    u, da = rnd(n, h, scale=2), rnd(n, h)
    w1, b1, w2 = rnd(h, d, scale=0.02), rnd(h, scale=0.02), rnd(d, h, scale=0.02)
    _, mean, rstd = R.layer_norm_fwd(x, w, b, 1e-5)
    y = torch.empty_like(x)
    mm = 2 * n * d * h
    yield ("layer_norm_fwd", lambda: L.layer_norm_fwd(x, w, b, 1e-5), lambda: F.layer_norm(x, (d,), w, b, 1e-5),
           lambda: R.layer_norm_fwd(x, w, b, 1e-5), 0, _nbytes(x, y) + 8 * n)  # fmt: skip
    yield ("layer_norm_bwd", lambda: L.layer_norm_bwd(dy, x, mean, rstd, w, b, res, True),
           lambda: (torch.ops.aten.native_layer_norm_backward(dy, x, (d,), mean[:, None], rstd[:, None], w, b,
                                                              [True, True, True])[0] + res,
                    F.layer_norm(x, (d,), w, b, 1e-5)),
           lambda: R.layer_norm_bwd(dy, x, mean, rstd, w, b, res, True), 0,
           _nbytes(dy, x, res, x, x) + 8 * n)  # fmt: skip
    yield ("bias_gelu", lambda: L.bias_gelu(u, b1, "tanh"), lambda: F.gelu(u + b1, approximate="tanh"),
           lambda: R.bias_gelu(u, b1, "tanh"), 0, 2 * _nbytes(u))  # fmt: skip
    yield ("gelu_bwd", lambda: L.gelu_bwd(da, u, "tanh"),
           lambda: torch.ops.aten.gelu_backward(da, u, approximate="tanh"), lambda: R.gelu_bwd(da, u, "tanh"), 0,
           3 * _nbytes(u))  # fmt: skip
    yield ("dropout_add", lambda: L.dropout_add(x, res, 0.1, 1234), lambda: F.dropout(x, 0.1) + res,
           lambda: R.dropout_add(x, res, 0.1, 1234), 0, 3 * _nbytes(x))  # fmt: skip
    yield ("ffn_recompute", lambda: L.ffn_recompute(x, mean, rstd, w, b, w1, b1, dy, w2, "tanh"),
           lambda: _eager_ffn_recompute(x, w, b, w1, b1, dy, w2),
           lambda: R.ffn_recompute(x, mean, rstd, w, b, w1, b1, dy, w2, "tanh"), 2 * mm,
           _nbytes(x, w1, dy, w2) + 2 * _nbytes(da) + 4 * h)  # fmt: skip
    yield ("linear_bias_gelu", lambda: L.linear_bias_gelu(x, w1, b1, "tanh"),
           lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh"), lambda: R.linear_bias_gelu(x, w1, b1, "tanh"),
           mm, _nbytes(x, w1, da))  # fmt: skip
    yield ("linear_gelu_bwd", lambda: L.linear_gelu_bwd(dy, w2, u, "tanh"),
           lambda: torch.ops.aten.gelu_backward(dy @ w2, u, approximate="tanh"),
           lambda: R.linear_gelu_bwd(dy, w2, u, "tanh"), mm, _nbytes(dy, w2) + 2 * _nbytes(u))  # fmt: skip
    yield ("gelu_linear_wgrad", lambda: L.gelu_linear_wgrad(dy, u, "tanh"),
           lambda: dy.t() @ F.gelu(u, approximate="tanh"), lambda: R.gelu_linear_wgrad(dy, u, "tanh"), mm,
           _nbytes(dy, u, w2))  # fmt: skip


def _eager_ffn_recompute(x, w, b, w1, b1, dy, w2):
    """What torch checkpointing runs for the same result: LN, FC1, GELU, the dA GEMM, GELU backward, db1 sum."""
    u = F.linear(F.layer_norm(x, (x.shape[1],), w, b, 1e-5), w1, b1)
    du = torch.ops.aten.gelu_backward(dy @ w2, u, approximate="tanh")
    return F.gelu(u, approximate="tanh"), du, du.float().sum(dim=0)


def _max_err(ours, ref) -> float:
    ours, ref = (o if isinstance(o, tuple) else (o,) for o in (ours, ref))
    return max((a.float() - r.float()).abs().max().item() for a, r in zip(ours, ref) if a.numel())


def run(device: str) -> list[dict]:
    if device == "cuda":
        n, d, h, dtype = 8192, 2048, 8192, torch.bfloat16
    else:
        n, d, h, dtype = 33, 72, 200, torch.float32
    rows = []
    for name, ours, eager, ref, flops, nbytes in cases(n, d, h, dtype, device):
        t_ours, t_eager = time_ms(ours, device), time_ms(eager, device)
        sec = t_ours * 1e-3
        rows.append(dict(kernel=name, shape=f"N={n} d={d} H={h} {str(dtype)[6:]}", triton_ms=t_ours,
                         eager_ms=t_eager, speedup=t_eager / t_ours, gb_s=nbytes / sec / 1e9,
                         tflop_s=flops / sec / 1e12, pct_bw=100 * nbytes / sec / PEAK_BYTES_PER_S,
                         pct_flops=100 * flops / sec / PEAK_FLOPS, max_abs_err=_max_err(ours(), ref())))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    return cli_main("gpu_kernels", __doc__.splitlines()[0], run, "Triton kernels vs torch eager", argv)


if __name__ == "__main__":
    raise SystemExit(main())
