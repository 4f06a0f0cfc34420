"""The Triton flash-attention kernels (kernels/flash_attention.py) under TRITON_INTERPRET=1 against float64 reference
math: causal and not, every mask form, hash dropout, GQA ratios, T and S not multiples of the 16-row interpreter tile,
fp32/bf16/fp16; the dropout mask bit for bit; the packed-qkv ops through the triton backend; the sm_90 compile of
compile_jobs (in a subprocess without TRITON_INTERPRET). Tiny shapes: the interpreter runs programs one by one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from test_attention_ops import _tolerance_check, make_mask, make_qkv, torch_same_dtype  # noqa: E402

import ckpt_ext  # noqa: E402
from ckpt_ext import ops, reference, reference_attention  # noqa: E402

pytestmark = pytest.mark.triton

CASES = [  # b, t, s, h, hk, dh, causal, mask, dropout_p, dtype
    (1, 7, 7, 2, 1, 12, True, None, 0.0, torch.float32),
    (2, 21, 21, 4, 2, 8, True, "bool_1hts", 0.3, torch.float32),
    (1, 21, 21, 2, 2, 16, False, "float_b1ts", 0.3, torch.float32),
    (3, 1, 1, 2, 1, 8, False, "float_ts", 0.0, torch.float32),
    (1, 5, 19, 4, 1, 8, False, "bool_b11s", 0.2, torch.float32),
    (1, 17, 17, 4, 1, 16, True, "bool_b11s", 0.0, torch.bfloat16),
    (1, 17, 17, 2, 1, 16, False, "float_b1ts", 0.2, torch.float16),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy evaluates both sides of tl.where
@pytest.mark.parametrize("b, t, s, h, hk, dh, causal, mask, dropout_p, dtype", CASES)
def test_triton_matches_float64_reference(b, t, s, h, hk, dh, causal, mask, dropout_p, dtype):
    from ckpt_ext.kernels import flash_attention_launchers as fa

    q, k, v = make_qkv(b, t, h, hk, dh, s=s, dtype=dtype)
    m = make_mask(mask, b, h, t, s, dtype if dtype != torch.bfloat16 else torch.float32)
    dout = torch.randn(b, t, h, dh, dtype=dtype)
    args = (causal, dropout_p, 21, m, dh**-0.5)
    out, lse = fa.gqa_attention_fwd(q, k, v, *args)
    grads = fa.gqa_attention_bwd(dout, q, k, v, out, lse, *args)
    r_out, r_lse = reference_attention.gqa_attention_fwd(q, k, v, *args)
    r_grads = reference_attention.gqa_attention_bwd(dout, q, k, v, r_out, r_lse, *args)
    t_out, _, t_grads = torch_same_dtype(dout, q, k, v, *args)
    d = [x.double() for x in (dout, q, k, v)]
    o64, l64 = reference_attention.gqa_attention_fwd(*d[1:], *args)
    g64 = reference_attention.gqa_attention_bwd(d[0], *d[1:], o64, l64, *args)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == (b, t, h, dh)
    _tolerance_check(out, o64, r_out, t_out)
    torch.testing.assert_close(lse.double(), l64, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    for ours, ref64, ref, eager in zip(grads, g64, r_grads, t_grads):
        assert ours.dtype == dtype and ours.shape == ref.shape
        _tolerance_check(ours, ref64, ref, eager, floor=1e-5)


CUDA_CASES = [  # b, t, h, hk, dh, causal, mask, dropout_p
    (2, 300, 8, 2, 64, True, None, 0.0),
    (2, 300, 8, 2, 64, True, "bool_b11s", 0.1),
    (1, 257, 4, 4, 128, False, "float_b1ts", 0.1),
    (3, 77, 8, 1, 80, True, "bool_1hts", 0.0),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, t, h, hk, dh, causal, mask, dropout_p", CUDA_CASES)
def test_triton_matches_float64_reference_cuda(dtype, b, t, h, hk, dh, causal, mask, dropout_p):
    """The compiled kernels (16-bit operand dots, GPU tiles 128×64 / 64×64) against float64 on the GPU."""
    from ckpt_ext.kernels import flash_attention_launchers as fa

    q, k, v = (x.cuda() for x in make_qkv(b, t, h, hk, dh, dtype=dtype, packed=True))
    m = make_mask(mask, b, h, t, t)
    m = None if m is None else m.cuda()
    dout = torch.randn(b, t, h, dh, dtype=dtype, device="cuda")
    args = (causal, dropout_p, 99, m, dh**-0.5)
    out, lse = fa.gqa_attention_fwd(q, k, v, *args)
    grads = fa.gqa_attention_bwd(dout, q, k, v, out, lse, *args)
    t_out, _, t_grads = torch_same_dtype(dout, q, k, v, *args)
    d = [x.double() for x in (dout, q, k, v)]
    o64, l64 = reference_attention.gqa_attention_fwd(*d[1:], *args)
    g64 = reference_attention.gqa_attention_bwd(d[0], *d[1:], o64, l64, *args)
    _tolerance_check(out, o64, t_out, floor=1e-5)
    torch.testing.assert_close(lse.double(), l64, atol=2e-3 if dtype == torch.float32 else 2e-2, rtol=0)
    for ours, ref64, eager in zip(grads, g64, t_grads):
        _tolerance_check(ours, ref64, eager, floor=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_dropout_mask_is_bit_identical():
    """v = one-hot rows per key (dh = S): out reads back P ∘ keep / (1 - p) per (b, i, t, s); its zeros are the
    dropped elements, which must be exactly reference.dropout_keep_mask's over the flat (B, h, T, S) index."""
    from ckpt_ext.kernels import flash_attention_launchers as fa

    b, t, h, hk = 2, 16, 2, 1
    q, k, _ = make_qkv(b, t, h, hk, 16)
    v = torch.eye(t)[None, :, None, :].expand(b, t, hk, t).contiguous()
    out, _ = fa.gqa_attention_fwd(q, k, v, False, 0.4, 12345, None, 0.25)
    keep = reference.dropout_keep_mask(b * h * t * t, 0.4, 12345).view(b, h, t, t)
    assert torch.equal(out.transpose(1, 2) != 0, keep)
    ref, _ = reference_attention.gqa_attention_fwd(q, k, v, False, 0.4, 12345, None, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_packed_ops_through_triton_backend():
    """GPT-2's packed attention ops run the flash kernels on the triton backend (strided q, k, v views of qkv)."""
    from ckpt_ext.kernels import flash_attention_launchers as fa

    assert ckpt_ext.backend._triton_impls()["attention_fwd"] is fa.attention_fwd
    b, t, heads, dh = 2, 9, 2, 8
    qkv = torch.randn(b, t, 3 * heads * dh, requires_grad=True)
    mask = make_mask("float_b1ts", b, heads, t, t)
    with ckpt_ext.set_backend("triton"):
        out, lse = ops.attention_fwd(qkv, heads, True, 0.25, 8, mask)
        (dqkv,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    x = qkv.detach().double()
    ref, ref_lse = reference.attention_fwd(x, heads, True, 0.25, 8, mask)
    ref_d = reference.attention_bwd(torch.ones_like(ref), x, ref, ref_lse, heads, True, 0.25, 8, mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dqkv.double(), ref_d, atol=1e-5, rtol=1e-5)


@pytest.mark.compile
def test_flash_attention_compiles_for_sm90():
    """compile_jobs(90) compiles with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)), no GPU."""
    script = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from ckpt_ext.kernels import flash_attention\n"
        "for name, fn, sig, const, opts in flash_attention.compile_jobs(90):\n"
        "    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget('cuda', 90, 32),\n"
        "                       options=opts)\n"
        "    print(name, const['BLOCK_D'], 'shared=%d' % k.metadata.shared, flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "shared=" in ln]
    assert len(lines) == 9
    for name in ("gqa_fwd", "gqa_bwd_dq", "gqa_bwd_dkdv"):
        assert sum(ln.startswith(name + " ") for ln in lines) == 3
    assert all(int(ln.split("shared=")[1]) <= 232448 for ln in lines)  # H100/H200 opt-in shared memory per block
