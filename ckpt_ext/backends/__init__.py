"""Kernel backends: each is a folder here that implements some ``ckpt_ext::*`` ops for some devices.

``REGISTRY`` is the one list of backends, in ``auto`` priority order (ckpt_ext.backend resolves ``auto`` to the first
one that runs on a device by default and is available). Adding a backend = its folder + one line here. A backend
module (the folder's ``__init__``, cheap to import: no triton, no CUDA) provides
    AUTO_DEVICES                 device types ``auto`` may pick it for
    unavailable(device_type=None) -> str | None   why it cannot run (on that device type), None when it can
    impls() -> dict[str, Callable]                op name -> implementation with the graph op's signature (the op
                                                  table, ckpt_ext/ops/table.py); ops it lacks run the reference math
Backends read the op table; the ops never import a backend (they call ckpt_ext.backend.kernel, the dispatch table).

    reference   ckpt_ext.reference / reference_attention (plain PyTorch), every device
    cpp         ckpt_ext._C's kernel ops (csrc/cpu, csrc/cuda) and aten_attention.py's routes
    cuda        the same, required to have CUDA kernels
    triton      the Triton kernels (ckpt_ext.kernels) through their launchers; CPU only under TRITON_INTERPRET=1
aten_attention.py: the aten-based attention routes (fused CPU flash, cuDNN/flash SDPA, tiled math) that the cpp and
cuda backends run and the triton launchers fall back to.
"""

REGISTRY = {
    "triton": "ckpt_ext.backends.triton",
    "cuda": "ckpt_ext.backends.cuda",
    "cpp": "ckpt_ext.backends.cpp",
    "reference": "ckpt_ext.backends.reference",
}
