"""Tile choice of the flash-attention kernels (flash_attention.py): ``gpu_tiles`` and its sm_90 table, read by the
triton backend's launcher (ckpt_ext/backends/triton/attention.py) and the compile lane (flash_attention.compile_jobs).
Imports torch and matmul_configs (no triton).
"""

from __future__ import annotations

import torch

from .matmul_configs import interpreting

# (kernel, fp32 operands) -> {BLOCK_D: (BLOCK_M, BLOCK_N, num_warps, num_stages)} on sm_90. Every entry compiles
# without register spills (flash_attention.compile_jobs, checked by the compile lane) at the heaviest flags and, for
# the 16-bit head dims 64 and 128, at six flag mixes (causal or not × bool / fp32 / same-dtype / no mask × dropout
# or not): the forward sits at 200-254 registers with 128×64 tiles and 8 warps; 4 warps (128 fp32 accumulator
# and score registers per thread at head dim 64) and the dk/dv kernel's 64×64×128 tiles (k, v, dk, dv held over
# the loop) spilled 8-576 bytes, so dk/dv takes 32 query rows per step at head dim 128 and 1 pipeline stage.
# fp32 operands (ieee dots on FMA units, operand slices in registers) take 32×32 tiles and 16-row dk/dv steps: 64×32
# forward tiles and 32-row dk/dv steps spilled 8-15,184 bytes (ptxas sometimes settles at 32-80 registers plus stack
# there; .maxnreg 255 made other configs spill instead, so no register limit is set). The fp32 forward at head dim
# 16 takes 1 stage: with 2 it spilled 8 bytes at 96 registers once the row ids took their |id| (negative key ids).
SM90_TILES = {
    ("gqa_fwd", False): {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3),
                         256: (64, 32, 8, 2)},
    ("gqa_bwd_dq", False): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 8, 2),
                            256: (64, 32, 8, 2)},
    ("gqa_bwd_dkdv", False): {16: (64, 64, 8, 1), 32: (64, 64, 8, 1), 64: (64, 64, 8, 1), 128: (32, 64, 8, 1),
                              256: (32, 32, 8, 1)},
    ("gqa_fwd", True): {16: (32, 32, 4, 1), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 4, 2),
                        256: (32, 32, 8, 2)},
    ("gqa_bwd_dq", True): {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 8, 2),
                           256: (32, 32, 8, 2)},
    ("gqa_bwd_dkdv", True): {16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 4, 2),
                             256: (16, 16, 4, 2)},
}  # fmt: skip


def gpu_tiles(name: str, dh: int, arch: int = 90, dtype: torch.dtype = torch.float16) -> tuple[dict, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) and (num_warps, num_stages) for kernel ``name`` (gqa_fwd, gqa_bwd_dq,
    gqa_bwd_dkdv) at head dim dh (BLOCK_D = next power of two, at least 16) from ``SM90_TILES``; before sm_90
    (A100: 164 KB of shared memory) at most 2 pipeline stages. 16×16 tiles under the interpreter."""
    block_d = max(16, 1 << (dh - 1).bit_length())
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": block_d}, {}
    bm, bn, warps, stages = SM90_TILES[(name, dtype == torch.float32)][block_d]
    stages = stages if arch >= 90 else min(stages, 2)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d}, {"num_warps": warps, "num_stages": stages}
