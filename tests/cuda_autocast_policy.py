"""CUDA autocast's dtype policy, reproduced on CPU for tests.

CPU autocast casts the same matmul-like ops to bf16 as CUDA autocast (linear, matmul, mm, bmm, baddbmm, addmm,
scaled_dot_product_attention), but it leaves layer_norm, softmax, exp, pow, sum, ... in the input dtype, while
CUDA autocast runs them in fp32 and returns fp32 (the "ops that can autocast to float32" list of the PyTorch
AMP docs). So a CPU bf16 test never sees the mixed dtypes a CUDA bf16 run makes, e.g. the lightning indexer's
LayerNorm'd key in fp32 next to its bf16 queries and weights.

`cuda_autocast_on_cpu()` is CPU bf16 autocast plus a TorchFunctionMode that applies CUDA's fp32 rule to those
ops: with autocast enabled, their floating inputs are cast to fp32 (calls with an explicit `dtype=`, `out=` or
in-place variants are left alone, as autocast leaves them).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# CUDA "ops that can autocast to float32" that this code base calls (functional, torch.* and Tensor-method forms)
FP32_OPS = {
    F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.softmin, F.softplus, F.normalize, F.cross_entropy,
    F.nll_loss, F.kl_div, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.cosine_similarity,
    F.binary_cross_entropy_with_logits,
    torch.softmax, torch.log_softmax, torch.exp, torch.expm1, torch.log, torch.log10, torch.log2, torch.log1p,
    torch.pow, torch.rsqrt, torch.reciprocal, torch.sum, torch.prod, torch.cumsum, torch.cumprod, torch.norm,
    torch.cdist, torch.acos, torch.asin, torch.cosh, torch.sinh, torch.tan, torch.erfinv, torch.dist, torch.renorm,
    T.softmax, T.log_softmax, T.exp, T.expm1, T.log, T.log10, T.log2, T.log1p, T.pow, T.__pow__, T.__rpow__,
    T.rsqrt, T.reciprocal, T.sum, T.prod, T.cumsum, T.cumprod, T.norm, T.acos, T.asin, T.cosh, T.sinh, T.tan,
    T.erfinv, T.dist, T.renorm,
    # registered for AutocastCUDA and outside its lower-precision and promote lists: fp32 out (torch >= 2.4)
    F.rms_norm, torch.rms_norm, torch.logsumexp, T.logsumexp, torch.linalg.vector_norm, torch.linalg.norm,
}


def _to_fp32(x):
    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16):
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


class CudaFp32Policy(TorchFunctionMode):
    """While CPU autocast is enabled, run CUDA autocast's fp32-list ops on fp32 inputs (so they return fp32)."""

    def __init__(self):
        super().__init__()
        self.calls = 0  # how many calls were cast (a test can check the policy took effect)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in FP32_OPS and torch.is_autocast_enabled("cpu") and kwargs.get("dtype") is None
                and kwargs.get("out") is None):
            cast = _to_fp32(args)
            if any(a is not b for a, b in zip(cast, args)):
                self.calls += 1
            return func(*cast, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_autocast_on_cpu(dtype=torch.bfloat16):
    """CPU autocast in `dtype` with CUDA's fp32 rule for norms, softmax, exp, pow, sum, ...; yields the policy."""
    policy = CudaFp32Policy()
    with torch.autocast("cpu", dtype=dtype), policy:
        yield policy
