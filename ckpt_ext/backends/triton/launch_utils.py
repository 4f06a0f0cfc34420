"""Helpers shared by the launchers (launchers.py, llama_launchers.py): coverage, 2-D views, grids, the partial-sum
reduction launch. Importing this module imports triton (only ever done by the triton backend)."""

from __future__ import annotations

import functools

import torch

from ...kernels.matmul_configs import interpreting
from ...kernels.reduce import column_sums_kernel

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POINTWISE_BLOCK = 1024


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on host ints (triton.cdiv is a constexpr function: ~2.6 µs a host call against ~0.1)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (0 for n ≤ 0), as triton.next_power_of_2 but a plain host function."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def covered(*tensors) -> bool:
    """True when every given tensor is a non-empty float32/16/bf16 tensor (None entries are ignored)."""
    return all(t is None or (t.dtype in KERNEL_DTYPES and t.numel() > 0) for t in tensors)


def rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view with unit column stride (copies only if the last dim is strided)."""
    return t if t.stride(1) == 1 else t.contiguous()


def upcast(*tensors) -> bool:
    """fp32 dots when interpreting (bf16 dots are wrong there), for fp32 operands, or when operand dtypes differ."""
    dtypes = {t.dtype for t in tensors}
    return interpreting() or len(dtypes) > 1 or torch.float32 in dtypes


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def row_warps(block_d: int) -> int:
    return min(max(block_d // 256, 1), 16)


def matmul_grid(m: int, n: int):
    return lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)


def bwd_programs(n: int, device: torch.device) -> int:
    """Programs of a row-looping norm backward: 4 per SM on a GPU (few fp32 partial rows to reduce), 4 otherwise."""
    if interpreting() or device.type != "cuda":
        return min(n, 4)
    return min(n, 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()))


def column_sums(part_a: torch.Tensor, dtype_a: torch.dtype, part_b=None, dtype_b=None):
    """Σ over the rows of fp32 (P, d) partials, in one launch for one or two buffers, stored in the given dtypes."""
    p, d = part_a.shape
    out_a = torch.empty((d,), dtype=dtype_a, device=part_a.device)
    out_b = torch.empty((d,), dtype=dtype_b, device=part_a.device) if part_b is not None else None
    block_d = min(next_pow2(d), 64 if part_a.is_cuda else 256)
    column_sums_kernel[(cdiv(d, block_d),)](
        part_a, out_a, part_b if part_b is not None else part_a, out_b if out_b is not None else out_a, p, d,
        HAS_B=part_b is not None, BLOCK_P=min(next_pow2(p), 32), BLOCK_D=block_d,
    )  # fmt: skip
    return out_a if part_b is None else (out_a, out_b)
