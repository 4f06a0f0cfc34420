"""``@triton.autotune`` configurations for the fused FFN matmuls, per GPU generation.

Tiles (BLOCK_M × BLOCK_N output, BLOCK_K reduction step), warps and pipeline stages:
- sm_90 (H100/H200, 228 KB shared memory): 128×256×64 / 8 warps / 3 stages at most (~144 KB of 16-bit tiles).
- sm_80 (A100, 164 KB): BLOCK_K 32 with 3-4 stages keeps the pipeline under ~100 KB.
Both lists are handed to autotune; ``prune_for_device`` keeps the ones for the running device's generation.
Configs whose fp32 tiles overflow shared memory fail to launch and are skipped by autotune's benchmark.
Under TRITON_INTERPRET=1 autotune fails with more than one config, so one tiny config (the smallest tl.dot tile)
is used instead: the interpreter runs programs one by one and its cost grows with their count, not their size.
CKPT_EXT_TRITON_AUTOTUNE=0 (read at import) uses one mid-size config without tuning: GPU test runs, where every
dtype/GELU variant would otherwise compile and time every config.
"""

import os

import triton

GROUP_M = 8


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M}, num_warps=warps,
                         num_stages=stages)  # fmt: skip


SM90 = (
    _config(128, 256, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(128, 64, 64, 4, 4),
)
SM80 = (
    _config(128, 256, 32, 8, 3),
    _config(128, 128, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
)
INTERPRETER = (_config(16, 32, 32, 4, 1),)
SINGLE = (_config(64, 128, 32, 4, 3),)  # fits fp32 operands on sm_80 and sm_90 too


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs() -> list:
    if interpreting():
        return list(INTERPRETER)
    if os.environ.get("CKPT_EXT_TRITON_AUTOTUNE", "1") == "0":
        return list(SINGLE)
    return list(SM90 + SM80)


def prune_for_device(configs, named_args, **kwargs):
    """early_config_prune hook: the sm_90 list on Hopper and newer, the sm_80 list on Ampere/Ada."""
    import torch

    if len(configs) <= 1 or not torch.cuda.is_available():
        return configs
    major, _ = torch.cuda.get_device_capability()
    wanted = {_key(c) for c in (SM90 if major >= 9 else SM80)}
    kept = [c for c in configs if _key(c) in wanted]
    return kept or configs


def _key(config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


AUTOTUNE = dict(key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune_for_device})
