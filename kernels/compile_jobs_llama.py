"""The compile lane's jobs for the Llama-family kernels and the gated-MLP pointwise kernels (SwiGLU; GeGLU of Gemma /
ModernBERT) (compile_check imports this; nothing here imports triton).

Each job is (name, jit fn, signature, constexprs, options), as compile_check._jobs yields. 16-bit signatures are bf16
(the dtype Llama-family models train in) plus the autocast mix (bf16 activations, fp32 norm weight and fp32 RMSNorm
output); fp32 signatures compile the UPCAST / ieee-dot variants with the CKPT_EXT_TRITON_AUTOTUNE=0 configs. Row
kernels use Llama-3-8B widths (d = 4096 -> BLOCK_D 4096, 16 warps; head_dim 128 for RoPE and the per-head norm).
"""

from __future__ import annotations


def largest(configs) -> tuple:
    """The config with the most accumulator registers per thread (then the most shared memory): where spills show."""
    return (max(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / c.num_warps,
                                        c.kwargs["BLOCK_K"] * c.num_stages)),)  # fmt: skip


def _opts(cfg) -> dict:
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _const(**kw) -> dict:
    return {k: "constexpr" for k in kw}


def llama_jobs(arch: int, all_configs: bool):
    from . import (
        act_linear_wgrad,
        gated,
        linear_swiglu,
        reduce,
        rms_norm,
        rope,
        swiglu_ffn_recompute,
        swiglu_pointwise,
    )
    from .matmul_configs import (
        DUAL_SINGLE,
        DUAL_SM80,
        DUAL_SM90,
        SINGLE,
        SM80,
        SM90,
        TRIPLE_SINGLE,
        TRIPLE_SM80,
        TRIPLE_SM90,
    )

    pick = (lambda cs: cs) if all_configs else largest
    tiles = pick(SM90 if arch >= 90 else SM80)
    dual = pick(DUAL_SM90 if arch >= 90 else DUAL_SM80)
    triple = pick(TRIPLE_SM90 if arch >= 90 else TRIPLE_SM80)
    f32 = "*fp32"
    # (activations, norm weight, norm output): bf16 throughout, the autocast mix, fp32
    for p, pw, py in (("*bf16", "*bf16", "*bf16"), ("*bf16", f32, f32), (f32, f32, f32)):
        round_n = p != f32
        for block_d, warps in ((4096, 16), (128, 4)):
            row = {"ROUND_N": round_n, "BLOCK_D": block_d}
            yield ("rms_norm_fwd", rms_norm.rms_norm_fwd_kernel,
                   dict(X=p, W=pw, Y=py, RSTD=f32, stride_x="i32", d="i32", eps="fp32", **_const(**row)), row,
                   {"num_warps": warps})  # fmt: skip
            bwd = {"HAS_DRES": True, "EMIT_Y": True, **row}
            yield ("rms_norm_bwd", rms_norm.rms_norm_bwd_kernel,
                   dict(DY=py, X=p, RSTD=f32, W=pw, DRES=p, DX=p, Y=py, DW_PART=f32, n_rows="i32", d="i32",
                        stride_dy="i32", stride_x="i32", stride_dres="i32", rows_per_program="i32", **_const(**bwd)),
                   bwd, {"num_warps": warps})  # fmt: skip
        if pw != p:  # the autocast mix only changes the norms
            continue
        sums = {"HAS_B": True, "BLOCK_P": 32, "BLOCK_D": 64}
        yield ("column_sums", reduce.column_sums_kernel,
               dict(PART_A=f32, OUT_A=pw, PART_B=f32, OUT_B=pw, P="i32", d="i32", **_const(**sums)), sums,
               {"num_warps": 4})  # fmt: skip
        for op, gate in (("swiglu", gated.SILU.value), ("geglu", gated.GELU_TANH.value)):
            pw_const = {"GATE": gate, "BLOCK": 1024}
            yield (f"{op}_fwd", gated.gated_fwd_kernel,
                   dict(G=p, U=p, H=p, F="i32", stride_g="i32", stride_u="i32", **_const(**pw_const)), pw_const,
                   {"num_warps": 4})  # fmt: skip
            yield (f"{op}_bwd", gated.gated_bwd_kernel,
                   dict(DH=p, G=p, U=p, DG=p, DU=p, F="i32", stride_dh="i32", stride_g="i32", stride_u="i32",
                        **_const(**pw_const)), pw_const, {"num_warps": 4})  # fmt: skip
        for inverse in (False, True):
            rc = {"INVERSE": inverse, "BLOCK_H": 32, "BLOCK_HALF": 64}
            yield ("rope", rope.rope_kernel,
                   dict(Q=p, K=p, COS=p, SIN=p, Q_OUT=p, K_OUT=p, T="i32", hq="i32", hk="i32", half="i32",
                        stride_qb="i32", stride_qt="i32", stride_qh="i32", stride_kb="i32", stride_kt="i32",
                        stride_kh="i32", stride_cb="i32", stride_ct="i32", **_const(**rc)), rc,
                   {"num_warps": 4})  # fmt: skip
        upcast = p == f32
        for cfg in DUAL_SINGLE if upcast else dual:
            const = {**cfg.kwargs, "HAS_BG": True, "HAS_BU": True, "UPCAST": upcast}
            yield ("linear_swiglu", linear_swiglu.linear_swiglu_kernel,
                   dict(X=p, WG=p, BG=p, WU=p, BU=p, OUT=p, M="i32", N="i32", K="i32", stride_xm="i32",
                        stride_xk="i32", stride_wgn="i32", stride_wgk="i32", stride_wun="i32", stride_wuk="i32",
                        **_const(**const)), const, _opts(cfg))  # fmt: skip
        for cfg in SINGLE if upcast else tiles:
            const = {**cfg.kwargs, "UPCAST": upcast}
            yield ("swiglu_linear_bwd", swiglu_pointwise.swiglu_linear_bwd_kernel,
                   dict(DY=p, WD=p, G=p, U=p, DG=p, DU=p, M="i32", N="i32", K="i32", stride_dym="i32",
                        stride_dyk="i32", stride_wk="i32", stride_wn="i32", stride_gm="i32", stride_um="i32",
                        **_const(**const)), const, _opts(cfg))  # fmt: skip
            wgrad = {**cfg.kwargs, "ACT": "swiglu", "UPCAST": upcast}
            yield ("swiglu_linear_wgrad", act_linear_wgrad.act_linear_wgrad_kernel,
                   dict(DY=p, G=p, U=p, DW=p, M="i32", N="i32", K="i32", stride_dyk="i32", stride_dym="i32",
                        stride_gk="i32", stride_uk="i32", **_const(**wgrad)), wgrad, _opts(cfg))  # fmt: skip
    for p, pw in (("*bf16", "*bf16"), ("*bf16", f32), (f32, f32)):
        upcast = p == f32
        for cfg in TRIPLE_SINGLE if upcast else triple:
            const = {**cfg.kwargs, "HAS_BG": False, "HAS_BU": False, "ROUND_N": p != f32, "ROUND_Y": pw == p != f32,
                     "UPCAST": upcast}  # fmt: skip
            yield ("swiglu_ffn_recompute", swiglu_ffn_recompute.swiglu_ffn_recompute_kernel,
                   dict(X1=p, RSTD=f32, NW=pw, WG=p, BG=p, WU=p, BU=p, DY=p, WD=p, H_OUT=p, DG_OUT=p, DU_OUT=p,
                        M="i32", N="i32", K="i32", stride_xm="i32", stride_wgn="i32", stride_wgk="i32",
                        stride_wun="i32", stride_wuk="i32", stride_dym="i32", stride_wdk="i32", stride_wdn="i32",
                        **_const(**const)), const, _opts(cfg))  # fmt: skip
