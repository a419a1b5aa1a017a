"""CUDA autocast's dtype policy, reproduced on CPU for tests.

CPU autocast casts the same matmul-like ops to bf16 as CUDA autocast (linear, matmul, mm, bmm, baddbmm, addmm,
scaled_dot_product_attention), but it leaves layer_norm, softmax, exp, pow, sum, ... in the input dtype, while
CUDA autocast runs them in fp32 and returns fp32. So a CPU bf16 test never sees the mixed dtypes a CUDA bf16 run
makes, e.g. the lightning indexer's LayerNorm'd key in fp32 next to its bf16 queries and weights.

`cuda_autocast_on_cpu()` is CPU autocast plus, while it is open, a Python kernel at the AutocastCPU dispatch key
for every aten op that has an AutocastCUDA kernel in this torch build and no AutocastCPU kernel, with CUDA's cast
policy for it (the op lists of aten/src/ATen/autocast_mode.h, below). The kernels sit where CUDA autocast sits, in
the dispatcher above autograd, so they see every aten call: also the calls nested in a Python function
(`1 / x` -> reciprocal) or in a C++ composite op (torch.special.log_softmax -> log_softmax), which the first
version of this file, a TorchFunctionMode that saw top-level Python calls only, left in bf16. Like CUDA's kernels
they run the op with autocast excluded, and their casts are recorded by autograd. Ops that AutocastCPU already
has a kernel for keep it: the matmuls (bf16 on both), and nll_loss, cross_entropy_loss, kl_div, mse_loss (fp32 on
both; on CUDA cross_entropy_loss decomposes into log_softmax and nll_loss, fp32 too).

The kernels exist only while the context is open, so run a backward inside it with autocast disabled (as
tests/backend_twins.training_step does): an activation checkpoint's recompute (chunked.selected_index_scores)
re-enters the forward's autocast during backward, and CUDA's policy must still apply there.
"""
from __future__ import annotations

import contextlib

import torch

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_HALF = (torch.bfloat16, torch.float16)

# aten/src/ATen/autocast_mode.h (torch 2.13): AT_FORALL_LOWER_PRECISION_FP and the two cudnn kernels
LOWER_PRECISION = {
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention", "cudnn_convolution",
    "cudnn_convolution_transpose"}
# AT_FORALL_FP32, and AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE (norm with dtype=float appended: the same numbers)
FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss",
    "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist",
    "renorm", "logsumexp", "rms_norm", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa", "norm.Scalar", "norm.ScalarOpt_dim", "norm.names_ScalarOpt_dim"}
# AT_FORALL_FP32_SET_OPT_DTYPE: dtype=float unless the call gives one (only when the first argument is eligible)
FP32_SET_OPT_DTYPE = {
    "prod", "prod.dim_int", "prod.dim_Dimname", "softmax.int", "softmax.Dimname", "log_softmax.int",
    "log_softmax.Dimname", "cumprod", "cumprod.dimname", "cumsum", "cumsum.dimname", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList", "sum.dim_DimnameList"}
# AT_FORALL_PROMOTE: every eligible tensor cast to the widest of them
PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "tensordot", "scatter_add"}
# autocast_mode.cpp: a kernel that refuses (CPU autocast has an fp32 kernel for it, which stays)
BANNED = {"binary_cross_entropy"}


def autocast_cuda_ops() -> list[str]:
    """The aten ops ("name.overload", "name" for the default) with an AutocastCUDA kernel in this torch build."""
    return sorted(name.removeprefix("aten::")
                  for name in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA"))


def policy_of(name: str) -> str:
    for policy, ops in (("lower_precision", LOWER_PRECISION), ("fp32", FP32),
                        ("fp32_set_opt_dtype", FP32_SET_OPT_DTYPE), ("promote", PROMOTE), ("banned", BANNED)):
        if name in ops:
            return policy
    raise ValueError(f"aten::{name} has an AutocastCUDA kernel but no policy here: add it to the lists of "
                   f"tests/cuda_autocast_policy.py (from aten/src/ATen/autocast_mode.h)")


def _eligible(x) -> bool:
    """CUDA's is_eligible: a floating tensor that is not fp64 (device aside: everything here is CPU)."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _cast(x, want, dtype: torch.dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if want(x) and x.dtype != dtype else x
    if isinstance(x, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in _flat(x)):
        return (list if isinstance(x, list) else tuple)(_cast(v, want, dtype) for v in x)
    return x


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


class CudaAutocastPolicy:
    """The AutocastCPU kernels of one `cuda_autocast_on_cpu()`; `calls` counts the calls that cast something
    (a test can check the policy took effect)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.calls = dtype, 0

    def register(self, lib) -> None:
        for name in autocast_cuda_ops():
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "AutocastCPU"):
                base, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, base), overload or "default")
                lib.impl(name, self._kernel(op, policy_of(name)), "AutocastCPU")

    def _kernel(self, op, policy: str):
        names = [a.name for a in op._schema.arguments]
        dtype_at = names.index("dtype") if "dtype" in names else None

        def kernel(*args, **kwargs):
            if policy == "banned":
                raise RuntimeError(f"{op} is unsafe to autocast (CUDA autocast refuses it); use the _with_logits form")
            cast_args, cast_kwargs = self._apply(policy, args, kwargs, dtype_at)
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                return op(*cast_args, **cast_kwargs)
        return kernel

    def _apply(self, policy: str, args: tuple, kwargs: dict, dtype_at: int | None):
        """CUDA's WrapFunction for `policy`: the arguments to run the op with."""
        if policy == "fp32_set_opt_dtype":
            given = kwargs.get("dtype") is not None or (dtype_at is not None and len(args) > dtype_at
                                                        and args[dtype_at] is not None)
            if given or not args or not _eligible(args[0]) or args[0].dtype == torch.float32:
                return args, kwargs
            self.calls += 1
            if dtype_at is not None and len(args) > dtype_at:
                return args[:dtype_at] + (torch.float32,) + args[dtype_at + 1:], kwargs
            return args, {**kwargs, "dtype": torch.float32}
        if policy == "fp32":
            want, dtype = (lambda t: t.dtype in _HALF), torch.float32
        elif policy == "lower_precision":
            want, dtype = _eligible, self.dtype
        else:  # promote
            want, dtype = _eligible, self.dtype
            for t in _flat([*args, *kwargs.values()]):
                dtype = torch.promote_types(dtype, t.dtype) if _eligible(t) else dtype
        cast_args, cast_kwargs = _cast(args, want, dtype), {k: _cast(v, want, dtype) for k, v in kwargs.items()}
        before, after = _flat([*args, *kwargs.values()]), _flat([*cast_args, *cast_kwargs.values()])
        if any(a is not b for a, b in zip(after, before)):
            self.calls += 1
        return cast_args, cast_kwargs


@contextlib.contextmanager
def cuda_autocast_on_cpu(dtype=torch.bfloat16):
    """CPU autocast in `dtype` with CUDA autocast's policy for every op CUDA has a kernel for; yields the policy.
    The kernels are registered on entry and removed on exit (not reentrant)."""
    policy = CudaAutocastPolicy(dtype)
    lib = torch.library.Library("aten", "IMPL")
    try:
        policy.register(lib)
        with torch.autocast("cpu", dtype=dtype):
            yield policy
    finally:
        lib._destroy()
