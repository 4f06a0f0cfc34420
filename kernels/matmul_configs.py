"""``@triton.autotune`` configurations for the fused matmuls, per GPU generation.

Tiles (BLOCK_M × BLOCK_N output, BLOCK_K reduction step), warps and pipeline stages. Every shipped config compiles
for sm_90 without register spills (compile_check reads registers, spills and shared memory from the cubin):
- sm_90 (H100/H200, 228 KB shared memory): 128×128×64 / 8 warps / 4 stages at most (128 KB of 16-bit tiles,
  115-138 registers with the GELU / dropout epilogues). 128×256 with 8 warps holds 128 fp32 accumulator registers
  per thread and the erf-GELU and dropout epilogues then spill (255 registers + 48-56 bytes of stack); with 16 warps
  the 128-register cap spills too; 128×128 with 4 warps spills likewise (255 + 136-144 bytes). Those are gone.
- sm_80 (A100, 164 KB): BLOCK_K 32 with 4 stages, the same accumulator-per-thread limit (BLOCK_M·BLOCK_N/warps ≤ 2048).
Both lists are handed to autotune; ``prune_for_device`` keeps the ones for the running device's generation.
Dual-GEMM kernels (ffn_recompute, linear_swiglu: two fp32 accumulators, up to four operand tiles per K-step) get
their own lists (``DUAL_*``): 128×128 tiles sat at the 255-register cap with 181 KB of shared memory (one CTA per SM),
so they stop at 128×64 with 8 warps (158 registers, 129 KB at 3 stages, bf16; with 4 warps the tanh-GELU epilogue
spilled). They all share BLOCK_M = DUAL_BLOCK_M,
which sizes ffn_recompute's per-row-block db1 scratch before the tuner has picked a config.
The three-accumulator swiglu_ffn_recompute gets ``TRIPLE_*`` (see its docstring for the register budget).
Configs whose fp32 tiles overflow shared memory fail to launch and are skipped by autotune's benchmark.
Under TRITON_INTERPRET=1 autotune fails with more than one config, so one tiny config (the smallest tl.dot tile)
is used instead: the interpreter runs programs one by one and its cost grows with their count, not their size.
CKPT_EXT_TRITON_AUTOTUNE=0 (read at import) uses one small config without tuning (``*SINGLE``): GPU test runs, where
every dtype/GELU variant would otherwise compile and time every config. They are also the configs the compile lane
checks with fp32 operands: fp32 ieee dots run on FMA units and keep BLOCK_K-deep operand slices in registers, so
BLOCK_K 32 spilled there (16 to 10,816 bytes of stack); BLOCK_K 16 with 8 warps does not.
"""

import os

import triton

GROUP_M = 8


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M}, num_warps=warps,
                         num_stages=stages)  # fmt: skip


SM90 = (
    _config(128, 128, 64, 16, 4),
    _config(128, 64, 64, 8, 4),
    _config(64, 128, 64, 8, 4),
    _config(64, 64, 64, 4, 4),
)
SM80 = (
    _config(128, 128, 32, 16, 4),
    _config(128, 64, 32, 8, 4),
    _config(64, 128, 32, 8, 4),
    _config(64, 64, 32, 4, 4),
)
INTERPRETER = (_config(16, 32, 32, 4, 1),)
SINGLE = (_config(64, 64, 16, 8, 2),)  # fp32 ieee dots: BLOCK_K 16 keeps the FMA dot from spilling

DUAL_BLOCK_M = 128
DUAL_SM90 = (
    _config(DUAL_BLOCK_M, 64, 64, 8, 3),
    _config(DUAL_BLOCK_M, 64, 32, 8, 4),
)
DUAL_SM80 = (_config(DUAL_BLOCK_M, 64, 32, 8, 3),)
DUAL_SINGLE = (_config(DUAL_BLOCK_M, 32, 16, 8, 2),)

TRIPLE_SM90 = (
    _config(128, 64, 64, 8, 3),
    _config(128, 64, 32, 8, 4),
    _config(64, 64, 64, 4, 3),
)
TRIPLE_SM80 = (
    _config(128, 64, 32, 8, 3),
    _config(64, 64, 32, 4, 3),
)
TRIPLE_SINGLE = (_config(64, 64, 16, 8, 2),)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs() -> list:
    if interpreting():
        return list(INTERPRETER)
    if os.environ.get("CKPT_EXT_TRITON_AUTOTUNE", "1") == "0":
        return list(SINGLE)
    return list(SM90 + SM80)


def dual_configs() -> list:
    """Configs of the dual-GEMM kernels (all with one BLOCK_M; the interpreter's tiny tile under TRITON_INTERPRET)."""
    if interpreting():
        return list(INTERPRETER)
    if os.environ.get("CKPT_EXT_TRITON_AUTOTUNE", "1") == "0":
        return list(DUAL_SINGLE)
    unique = {_key(c): c for c in DUAL_SM90 + DUAL_SM80}
    return list(unique.values())


def triple_configs() -> list:
    """Configs of the three-accumulator swiglu_ffn_recompute (the interpreter's tiny tile under TRITON_INTERPRET)."""
    if interpreting():
        return list(INTERPRETER)
    if os.environ.get("CKPT_EXT_TRITON_AUTOTUNE", "1") == "0":
        return list(TRIPLE_SINGLE)
    unique = {_key(c): c for c in TRIPLE_SM90 + TRIPLE_SM80}
    return list(unique.values())


def pruner(sm90, sm80):
    """An early_config_prune hook keeping ``sm90`` on Hopper and newer, ``sm80`` on Ampere/Ada."""

    def prune(configs, named_args, **kwargs):
        import torch

        if len(configs) <= 1 or not torch.cuda.is_available():
            return configs
        major, _ = torch.cuda.get_device_capability()
        wanted = {_key(c) for c in (sm90 if major >= 9 else sm80)}
        kept = [c for c in configs if _key(c) in wanted]
        return kept or configs

    return prune


prune_for_device = pruner(SM90, SM80)


def _key(config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


AUTOTUNE = dict(key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune_for_device})
DUAL_AUTOTUNE = dict(key=["M", "N", "K"], prune_configs_by={"early_config_prune": pruner(DUAL_SM90, DUAL_SM80)})
TRIPLE_AUTOTUNE = dict(key=["M", "N", "K"], prune_configs_by={"early_config_prune": pruner(TRIPLE_SM90, TRIPLE_SM80)})
