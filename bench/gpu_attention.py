"""Time ckpt_ext's Triton flash attention (forward, forward + backward) against torch SDPA's flash and
memory-efficient backends, with and without a padding mask.

    python -m bench.gpu_attention [--device cuda|cpu]

Cases (cuda): bf16, B=2, T=4096, head dim 128, causal; GQA (32 query / 8 kv heads) and MHA (32 / 32); no mask, and
a key-padding mask as a bool (B, 1, T, T) tensor (batch b sees keys s < L_b, L = T and 3T/4). The causal + mask rows
give SDPA the mask combined with the causal triangle (SDPA takes no is_causal beside a mask) and ckpt_ext the same
mask with causal=True (so its kernels skip the tiles above the diagonal, as SDPA's is_causal does).
Implementations, each timed on the same q (B, T, h, dh) / k, v (B, T, hk, dh) tensors:
- ``ckpt_ext_triton``: ckpt_ext/backends/triton/attention.gqa_attention_fwd / _bwd (the kernels the triton backend
  runs; forward + backward = one forward, then the dq and dk/dv kernels from the saved out and lse);
- ``ckpt_ext_triton_segments`` (padding rows only): the same kernels given the padding as segment ids
  (ckpt_ext.segments.from_lengths: T ints per batch row, compared in registers, key tiles past a row's length
  skipped) instead of the (B, 1, T, T) mask; its padded query rows see no key (zeros), so its parity column covers
  the unpadded rows;
- ``sdpa_flash`` / ``sdpa_efficient``: F.scaled_dot_product_attention on (B, h, T, dh) views under
  torch.nn.attention.sdpa_kernel(FLASH_ATTENTION / EFFICIENT_ATTENTION), enable_gqa=True, autograd backward (a
  backend that rejects the case, e.g. flash with a mask, gives a row with ``unsupported``).
Per row: forward ms, forward + backward ms, TFLOP/s of each (the causal count for every implementation: forward
2·B·h·T²·dh, backward 2.5× that), forward + backward time relative to each SDPA backend (ours / theirs, < 1: faster)
and the largest |out - SDPA out| (efficient backend, else flash) as a parity check. --device cpu (TRITON_INTERPRET=1)
runs the plumbing at tiny fp32 shapes (B=2, T=9, 2/1 and 2/2 heads, head dim 16; CPU SDPA has no efficient
backend): timings meaningless.
Writes gpu_attention.csv / .md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .gpu_common import cli_main, time_ms

BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def _lengths(b: int, t: int, device) -> torch.Tensor:
    """(B,) key lengths L = T, 3T/4, T, ... (every row keeps key 0)."""
    return torch.tensor([t if i % 2 == 0 else (3 * t) // 4 for i in range(b)], device=device)


def _padding_mask(b: int, t: int, device) -> torch.Tensor:
    """(B, 1, T, T) bool: batch i keeps keys s < L_i."""
    keep = torch.arange(t, device=device)[None, :] < _lengths(b, t, device)[:, None]  # (B, T) over keys
    return keep[:, None, None, :].expand(b, 1, t, t).contiguous()


def _ours(q, k, v, mask, dout, segment_ids=None):
    """(forward fn, forward + backward fn, forward output) of the Triton launchers."""
    from ckpt_ext.backends.triton import attention as fa

    args = (True, 0.0, 0, mask, q.shape[-1] ** -0.5)

    def fwd():
        return fa.gqa_attention_fwd(q, k, v, *args, segment_ids=segment_ids)

    def fwd_bwd():
        out, lse = fwd()
        return fa.gqa_attention_bwd(dout, q, k, v, out, lse, *args, segment_ids=segment_ids)

    return fwd, fwd_bwd, fwd()[0]


def _sdpa(backend, q, k, v, mask, dout):
    """(forward fn, forward + backward fn, forward output (B, T, h, dh)) of SDPA under one backend; q, k, v leaves
    (B, T, heads, dh) with requires_grad, transposed to (B, heads, T, dh) inside (views, as a model would)."""
    causal_mask = None
    if mask is not None:
        t = q.shape[1]
        causal_mask = mask & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()

    def call():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=causal_mask,
                is_causal=mask is None, enable_gqa=q.shape[2] != k.shape[2],
            )  # fmt: skip
        return out.transpose(1, 2)

    def fwd():
        with torch.no_grad():
            return call()

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        call().backward(dout)

    out = fwd()
    fwd_bwd()  # raises here too if the backend has no backward for the case
    return fwd, fwd_bwd, out


def run(device: str) -> list[dict]:
    if device == "cuda":
        b, t, dh, dtype, head_pairs = 2, 4096, 128, torch.bfloat16, ((32, 8), (32, 32))
    else:
        b, t, dh, dtype, head_pairs = 2, 9, 16, torch.float32, ((2, 1), (2, 2))
    rows = []
    gen = torch.Generator().manual_seed(0)
    for h, hk in head_pairs:
        q, k, v, dout = (
            torch.randn(b, t, n, dh, generator=gen).to(device=device, dtype=dtype) for n in (h, hk, hk, h)
        )  # fmt: skip
        fwd_flops = 2 * b * h * t * t * dh  # causal: half of 4·B·h·T²·dh
        total_flops = fwd_flops * 3.5
        for mask_name in ("none", "padding"):
            mask = None if mask_name == "none" else _padding_mask(b, t, device)
            case = dict(heads=f"{h}/{hk}", mask=mask_name, B=b, T=t, dh=dh, dtype=str(dtype).removeprefix("torch."))
            results = {}
            impls = ("ckpt_ext_triton", "ckpt_ext_triton_segments") if mask is not None else ("ckpt_ext_triton",)
            for impl in (*impls, *BACKENDS):
                try:
                    if impl == "ckpt_ext_triton":
                        fwd, fwd_bwd, out = _ours(q, k, v, mask, dout)
                    elif impl == "ckpt_ext_triton_segments":
                        from ckpt_ext import segments

                        ids = segments.from_lengths(_lengths(b, t, device), t)  # (B, T) int32
                        fwd, fwd_bwd, out = _ours(q, k, v, None, dout, segment_ids=ids)
                    else:
                        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                        fwd, fwd_bwd, out = _sdpa(BACKENDS[impl], *leaves, mask, dout)
                    reps = 5 if device == "cuda" else 1
                    results[impl] = (time_ms(fwd, device, reps), time_ms(fwd_bwd, device, reps), out)
                except RuntimeError as exc:  # SDPA: "No available kernel" for this backend and case
                    results[impl] = (math.nan, math.nan, None)
                    print(f"{impl} {case}: unsupported ({str(exc).splitlines()[0][:120]})", flush=True)
            ref = results["sdpa_efficient"][2] if results["sdpa_efficient"][2] is not None else results["sdpa_flash"][2]
            for impl, (f_ms, fb_ms, out) in results.items():
                row = dict(impl=impl, **case, status="ok" if out is not None else "unsupported", fwd_ms=f_ms,
                           fwd_bwd_ms=fb_ms, fwd_tflops=fwd_flops / f_ms / 1e9,
                           fwd_bwd_tflops=total_flops / fb_ms / 1e9)  # fmt: skip
                for other in BACKENDS:
                    row[f"fwd_bwd_vs_{other}"] = fb_ms / results[other][1]
                diff = math.nan
                if out is not None and ref is not None:
                    err = (out.float() - ref.float()).abs()  # (B, T, h, dh)
                    if impl == "ckpt_ext_triton_segments":  # padded query rows see no key there (zeros): unpadded rows
                        err = err[torch.arange(t, device=device)[None, :] < _lengths(b, t, device)[:, None]]
                    diff = err.max().item()
                row["max_abs_diff_vs_sdpa"] = diff
                rows.append(row)
                print(row, flush=True)
    return rows


def main(argv=None) -> int:
    return cli_main("gpu_attention", __doc__.splitlines()[0], run, "Flash attention vs SDPA", argv)


if __name__ == "__main__":
    raise SystemExit(main())
