"""Launchers of the LM head's Triton kernels (ckpt_ext/kernels/linear_cross_entropy.py, where the algorithm is
described) with the graph ops' signatures: ``IMPLS`` maps linear_cross_entropy_fwd / _bwd.

The forward combines the kernel's (SPLITS, N) fp32 partials with torch; the backward walks vocabulary chunks of
ckpt_ext.lm_head.chunk_len(chunk_bytes, N, dtype, V) columns (dz kernel, then cuBLAS for dweight and dhidden).
Under TRITON_INTERPRET=1 only fp32 runs the kernels; float64, empty inputs and 16-bit tensors under the interpreter
take the reference math. Importing this module imports triton.
"""

from __future__ import annotations

import torch

from ... import reference
from ...kernels.linear_cross_entropy import (
    GROUP_M,
    linear_cross_entropy_dz_kernel,
    linear_cross_entropy_fwd_kernel,
    tiles,
)
from ...kernels.matmul_configs import interpreting
from ...lm_head import chunk_len
from .launch_utils import cdiv, rows


def _covered(hidden: torch.Tensor) -> bool:
    ok = (torch.float32,) if interpreting() else (torch.float32, torch.float16, torch.bfloat16)
    return hidden.dtype in ok and hidden.numel() > 0


def _splits(n_row_blocks: int, v_tiles: int, device: torch.device) -> int:
    """V splits so that about two programs per SM run (two under the interpreter, to exercise the combine)."""
    if interpreting() or device.type != "cuda":
        return min(2, v_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_tiles, cdiv(2 * sms, n_row_blocks)))


def linear_cross_entropy_fwd(hidden, weight, bias, labels, ignore_index, label_smoothing, chunk_bytes):
    if not _covered(hidden):
        return reference.linear_cross_entropy_fwd(hidden, weight, bias, labels, ignore_index, label_smoothing,
                                                  chunk_bytes)  # fmt: skip
    x = rows(hidden)
    n, k = x.shape
    v = weight.shape[0]
    bm, bn, bk, warps, stages = tiles(x.dtype, forward=True)
    v_tiles = cdiv(v, bn)
    splits = _splits(cdiv(n, bm), v_tiles, x.device)
    v_per_split = cdiv(v_tiles, splits) * bn
    splits = cdiv(v, v_per_split)  # every split starts below V
    y = labels.to(torch.int64).contiguous()
    parts = torch.empty((4, splits, n), dtype=torch.float32, device=x.device)
    linear_cross_entropy_fwd_kernel[(cdiv(n, bm), splits)](
        x, weight, bias if bias is not None else weight, y, parts[0], parts[1], parts[2], parts[3], n, v, k,
        x.stride(0), weight.stride(0), weight.stride(1), v_per_split, HAS_BIAS=bias is not None,
        UPCAST=x.dtype == torch.float32 or interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    m_part, s_part, zy, sz = parts.unbind(0)  # (SPLITS, N) each
    m = m_part.max(dim=0).values
    lse = m + torch.log((s_part * torch.exp(m_part - m)).sum(dim=0))
    loss = lse - (1.0 - label_smoothing) * zy.sum(dim=0)
    if label_smoothing != 0.0:
        loss = loss - label_smoothing / v * sz.sum(dim=0)
    return torch.where(y != ignore_index, loss, 0.0), lse


def linear_cross_entropy_bwd(dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, chunk_bytes,
                             need_dweight):  # fmt: skip
    if not _covered(hidden) or lse.dtype != torch.float32:
        return reference.linear_cross_entropy_bwd(dloss, hidden, weight, bias, labels, lse, ignore_index,
                                                  label_smoothing, chunk_bytes, need_dweight)  # fmt: skip
    x = rows(hidden)
    n, k = x.shape
    v = weight.shape[0]
    bm, bn, bk, warps, stages = tiles(x.dtype)
    y = labels.to(torch.int64).contiguous()
    g = dloss.to(torch.float32).contiguous()
    lse = lse.contiguous()
    cols = chunk_len(chunk_bytes, n, x.dtype, v)
    dz_buf = torch.empty((n * cols,), dtype=x.dtype, device=x.device)
    dh = torch.zeros((n, k), dtype=x.dtype, device=x.device)
    dh_acc = (
        torch.zeros((n, k), dtype=torch.float32, device=x.device) if x.dtype != torch.float32 and cols < v else None
    )
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if need_dweight else x.new_empty((0,))
    db = torch.empty((v,), dtype=torch.float32, device=x.device) if bias is not None else None
    for c0 in range(0, v, cols):
        c = min(cols, v - c0)
        wc, dz = weight[c0 : c0 + c], dz_buf[: n * c].view(n, c)
        linear_cross_entropy_dz_kernel[(cdiv(n, bm) * cdiv(c, bn),)](
            x, wc, bias[c0:] if bias is not None else wc, y, lse, g, dz, n, c, k, x.stride(0), wc.stride(0),
            wc.stride(1), c0, ignore_index, label_smoothing / v, 1.0 - label_smoothing, HAS_BIAS=bias is not None,
            UPCAST=x.dtype == torch.float32 or interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if need_dweight:
            torch.mm(dz.t(), x, out=dw[c0 : c0 + c])  # this chunk's rows, complete
        if x.dtype == torch.float32:
            dh.addmm_(dz, wc)
        else:
            torch.mm(dz, wc, out=dh)
            if dh_acc is not None:
                dh_acc += dh  # fp32 sum across chunks (the 16-bit product is widened in the add kernel)
        if db is not None:
            db[c0 : c0 + c] = dz.sum(dim=0, dtype=torch.float32)
    if dh_acc is not None:
        dh.copy_(dh_acc)
    dbias = db.to(bias.dtype) if bias is not None else x.new_empty((0,))
    return dh, dw, dbias


IMPLS = {
    "linear_cross_entropy_fwd": linear_cross_entropy_fwd,
    "linear_cross_entropy_bwd": linear_cross_entropy_bwd,
}
