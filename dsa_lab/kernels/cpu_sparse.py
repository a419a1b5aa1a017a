"""Token-level sparse attention on CPU that never materialises the gathered keys/values: a small C++ kernel
(`cpu_sparse.cpp`, built with the system C++ compiler at first use, cached, loaded with ctypes).

Per query t and KV head g the kernel reads each selected key/value row once, straight inside the dot products, and
uses it for all G = H / Hkv query heads of the group (MHA G = 1, GQA, MQA Hkv = 1): no (L, K, H, D) gather, no KV
head repeated per query head. K and V are read token-major (a selected token is one contiguous row for all its KV heads; copied once per
forward when they come head-major). Forward writes out and the log-sum-exp; the backward recomputes the scores per
query and, for GQA/MQA, adds dK/dV into per-worker token-major tables (no atomics); for MHA it runs two passes that
write no random row: dq query by query, then dK/dV key by key from the queries that selected each key (the selection
inverted by a counting sort; the same bits for any thread count) — `key_major_backward` chooses. Query chunks run
on `run_chunks`' Python worker threads (ctypes drops the GIL), so no second OpenMP runtime runs beside torch's. Past
PASS_BYTES of random rows (long sequences) each worker covers its queries (or keys) in passes of a few KV heads, so a
pass's random rows stay in the CPU's cache.

  sparse_attention_cpu(q, k, v, selected_idx, valid, return_probs)   q (B, H, L, D), k (B, Hkv, L, D),
      v (B, Hkv, L, Dv) -> out (B, H, L, Dv), probs (B, H, L, K) (detached) or None
  kernel_available(q) / kernel_status()   whether the kernel serves these tensors, and why not
  decode_attention(q, k_cache, v_cache, selected_idx, scale)   a cached decode step's one row over the selected rows
      of the preallocated caches, read in place (no autograd; `decode_available`)

The build (dsa_lab/kernels/cpp_build.py): the system C++ compiler at first use, cached. When no compiler works, the
first call warns once and every caller takes the torch path (`chunked.sparse_attention_gather`, the reference twin).
DSA_LAB_CPU_KERNEL=0 turns the kernel off. fp32 and fp64 only; other dtypes take the torch path.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from dsa_lab.common.work_sizes import chunk_bounds
from dsa_lab.kernels.chunked import run_chunks
from dsa_lab.kernels.cpp_build import CppKernel, longs as _longs, ptr as _ptr
from sparse_attention import check_selection

KERNEL = CppKernel(Path(__file__).with_name("cpu_sparse.cpp"), "using the torch gather path")
QUERIES_PER_CALL = 64  # queries per kernel call (a share of run_chunks' work; ~1 ms of work at k 256, H 8)
# K/V bytes (dK/dV too in the backward) a worker's pass over all its queries may touch: its random rows then come
# from the cache instead of memory. Above it the KV heads are split into passes (each pass: every query, a few heads)
PASS_BYTES = 8 << 20
_TYPES = {torch.float32: "f32", torch.float64: "f64"}


def _library():
    """The loaded kernel library, or None (the reason is in kernel_status(); warned once)."""
    return KERNEL.library()


def kernel_status() -> str:
    """'built' or why the kernel is not used."""
    return KERNEL.status()


def kernel_available(q: torch.Tensor) -> bool:
    """The kernel serves q's device and dtype (CPU, fp32/fp64, no autocast to another dtype), is built, and this is
    no torch.compile trace (dynamo cannot trace a ctypes call: compiled models take the traceable torch path)."""
    return (not torch.compiler.is_compiling() and q.device.type == "cpu" and q.dtype in _TYPES
            and not torch.is_autocast_enabled("cpu") and _library() is not None)


def _strides(t):
    return _longs(*t.stride()[:3])


def _token_major(t):
    """(B, Hkv, L, D) -> the same values as a view of token-major (B, L, Hkv, D) memory (copied unless it is)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def head_passes(Hkv: int, L: int, row_bytes: int) -> list[tuple[int, int]]:
    """The KV-head ranges [g0, g1) a worker's calls cover one after another: as many KV heads per pass as keep the
    pass's rows (row_bytes per token and KV head) within PASS_BYTES, at least one. Every pass computes its heads
    exactly as one pass over all heads would (heads are independent; a KV head's query heads stay together)."""
    per_pass = max(1, min(Hkv, PASS_BYTES // max(1, L * row_bytes)))
    return [(g, min(g + per_pass, Hkv)) for g in range(0, Hkv, per_pass)]


class _SparseAttentionCPU(torch.autograd.Function):
    """The kernel's forward and backward; saves q, k, v, the selection, out and the log-sum-exp (B, H, L)."""

    @staticmethod
    def forward(ctx, q, k, v, selected_idx, return_probs, scale):
        lib, kind = _library(), _TYPES[q.dtype]
        B, H, L, D = q.shape
        Hkv, Dv, K = k.shape[1], v.shape[-1], selected_idx.shape[-1]
        dims = _longs(B, H, Hkv, L, D, Dv, K)
        out = q.new_empty(B, H, L, Dv)
        lse = q.new_empty(B, H, L)
        probs = q.new_zeros(B, H, L, K) if return_probs else None
        fwd = getattr(lib, f"dsa_sparse_fwd_{kind}")
        k, v = _token_major(k), _token_major(v)  # (B, Hkv, L, D) views of (B, L, Hkv, D) memory
        qs, ks, vs = _strides(q), _strides(k), _strides(v)
        passes = head_passes(Hkv, L, (D + Dv) * q.element_size())  # K and V rows

        def calls(share):
            for g0, g1 in passes:
                for t0, t1 in share:
                    fwd(_ptr(q), _ptr(k), _ptr(v), _ptr(selected_idx), _ptr(out), _ptr(lse), _ptr(probs), dims, qs, ks,
                        vs, ctypes.c_int64(t0), ctypes.c_int64(t1), ctypes.c_int64(g0), ctypes.c_int64(g1),
                        ctypes.c_double(scale))

        run_chunks(calls, chunk_bounds(L, QUERIES_PER_CALL), q.device)
        ctx.save_for_backward(q, k, v, selected_idx, out, lse)
        ctx.scale = scale
        if probs is not None:
            ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        q, k, v, selected_idx, out, lse = ctx.saved_tensors
        B, H, L, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        grad_out = _last_dim_contiguous(grad_out)
        dq, delta = q.new_empty(B, H, L, D), q.new_empty(B, H, L)
        call = _BackwardCall(q, k, v, selected_idx, out, lse, grad_out, ctx.scale)
        if not key_major_backward(H, Hkv):  # scatter: the query calls also add dK/dV to their worker's own tables
            passes = head_passes(Hkv, L, 2 * (D + Dv) * q.element_size())  # K, V and the worker's dK, dV rows

            def scatter_calls(share):  # writes the share's rows of dq; returns its own dK, dV accumulators
                dk, dv = q.new_zeros(B, L, Hkv, D), q.new_zeros(B, L, Hkv, Dv)  # token-major
                call.queries(share, passes, dq, delta, dk, dv)
                return dk, dv

            parts = run_chunks(scatter_calls, chunk_bounds(L, QUERIES_PER_CALL), q.device)
            dk, dv = (sum(x[1:], x[0]).transpose(1, 2) for x in zip(*parts))
            return dq, dk, dv, None, None, None
        passes = head_passes(Hkv, L, (D + Dv) * q.element_size())  # pass A: K, V rows
        run_chunks(lambda share: call.queries(share, passes, dq, delta), chunk_bounds(L, QUERIES_PER_CALL), q.device)
        off, queries = invert_selection(selected_idx)
        dk, dv = q.new_empty(B, Hkv, L, D), v.new_empty(B, Hkv, L, Dv)
        passes = head_passes(Hkv, L, H // Hkv * (D + Dv) * q.element_size())  # pass B: a KV head's q and dO rows
        run_chunks(lambda share: call.keys(share, passes, delta, off, queries, dk, dv),
                   chunk_bounds(L, QUERIES_PER_CALL), q.device)
        return dq, dk, dv, None, None, None


def key_major_backward(H: int, Hkv: int) -> bool:
    """The backward's choice: two passes (dK/dV key by key, no random writes) for MHA; the scatter into per-worker
    dK/dV tables where a KV group's G > 1 query heads share each random row update (GQA, MQA). Measured
    (docs/benchmarks.md "Two backwards", Zen 4, two threads): MHA L 16384, k 256 backward 1.87-2.14 s scatter ->
    1.12-1.23 s two passes; GQA 9/3 L 8192, k 128 0.16-0.20 s scatter vs 0.23-0.29 s two passes."""
    return H == Hkv


class _BackwardCall:
    """The backward's kernel calls over shares of queries (dq, delta; with dk/dv the scatter) or of keys (pass B)."""

    def __init__(self, q, k, v, selected_idx, out, lse, grad_out, scale):
        lib, kind = _library(), _TYPES[q.dtype]
        self.by_query, self.by_key = (getattr(lib, f"dsa_sparse_bwd_{p}_{kind}") for p in ("queries", "keys"))
        B, H, L, D = q.shape
        self.dims = _longs(B, H, k.shape[1], L, D, v.shape[-1], selected_idx.shape[-1])
        self.tensors, self.scale = (q, k, v, selected_idx, out, lse, grad_out), ctypes.c_double(scale)
        self.strides = tuple(_strides(t) for t in (q, k, v, grad_out))

    def queries(self, share, passes, dq, delta, dk=None, dv=None):
        q, k, v, idx, out, lse, grad_out = self.tensors
        for g0, g1 in passes:
            for t0, t1 in share:
                self.by_query(_ptr(q), _ptr(k), _ptr(v), _ptr(idx), _ptr(out), _ptr(lse), _ptr(grad_out), _ptr(dq),
                              _ptr(delta), _ptr(dk), _ptr(dv), self.dims, *self.strides, ctypes.c_int64(t0),
                              ctypes.c_int64(t1), ctypes.c_int64(g0), ctypes.c_int64(g1), self.scale)

    def keys(self, share, passes, delta, off, queries, dk, dv):
        q, k, v, _, _, lse, grad_out = self.tensors
        for g0, g1 in passes:
            for s0, s1 in share:
                self.by_key(_ptr(q), _ptr(k), _ptr(v), _ptr(lse), _ptr(delta), _ptr(grad_out), _ptr(off),
                            _ptr(queries), _ptr(dk), _ptr(dv), self.dims, *self.strides, ctypes.c_int64(s0),
                            ctypes.c_int64(s1), ctypes.c_int64(g0), ctypes.c_int64(g1), self.scale)


def invert_selection(selected_idx: torch.Tensor):
    """selected_idx (B, L, K) int64 (-1 invalid) -> off (B, L + 1) int64, queries (B, L * K) int32: the queries that
    select key s of batch row b, ascending, are queries[b, off[b, s]:off[b, s + 1]] (one C++ counting sort)."""
    B, L, K = selected_idx.shape
    off = selected_idx.new_empty(B, L + 1)
    queries = torch.empty(B, L * K, dtype=torch.int32)
    _library().dsa_invert_selection(_ptr(selected_idx), _longs(B, 1, 1, L, 1, 1, K), _ptr(off), _ptr(queries))
    return off, queries


def check_gqa_shapes(q, k, v) -> None:
    """q (B, H, L, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv) with Hkv dividing H; else one ValueError naming the fix."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D), (B, Hkv, L, D), (B, Hkv, L, Dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, L, D) or v.shape[:3] != (B, Hkv, L) or H % Hkv:
        raise ValueError(f"k must be (B, Hkv, L, D) and v (B, Hkv, L, Dv) with Hkv dividing H = {H} (GQA) and "
                         f"(B, L, D) = {(B, L, D)} as q; got k {tuple(k.shape)}, v {tuple(v.shape)}")


def sparse_attention_cpu(q, k, v, selected_idx, valid, return_probs: bool = False, scale: float | None = None):
    """Token-level DSA through the C++ kernel (see the module docstring; needs `kernel_available(q)`).
    q (B, H, L, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv), selected_idx/valid (B, L, K) (the selection contract:
    invalid slots are exactly the -1 ones) -> out (B, H, L, Dv), probs (B, H, L, K) (detached, 0 invalid) or None.
    Scores are scaled by `scale` (default D^-1/2). A row with no valid slot gives 0."""
    check_gqa_shapes(q, k, v)
    check_selection(selected_idx, valid, q.shape[2])
    if not kernel_available(q):
        raise ValueError(f"the C++ sparse-attention kernel does not serve {q.device} {q.dtype} tensors "
                         f"({kernel_status()}); use chunked.sparse_attention_gather")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _SparseAttentionCPU.apply(q, k, v, selected_idx.to(torch.long).contiguous(), return_probs, scale)  # int64 for C


def decode_attention(q, k_cache, v_cache, selected_idx, scale: float | None = None) -> torch.Tensor:
    """A cached decode step's sparse attention, no autograd: q (B, H, 1, D) of the new token over the selected rows
    of the caches k_cache (B, Hkv, T, D), v_cache (B, Hkv, T, Dv) (any T >= the positions, e.g. the whole
    preallocated buffers: each row is read in place, nothing gathered), selected_idx (B, K) positions (-1 invalid)
    -> out (B, 1, H, Dv). One kernel call on the caller's thread (a few ten us: no worker threads). Needs
    `decode_available(q, k_cache, v_cache)`. Its twin: the rows gathered and SDPA (tests/test_cpu_sparse_decode.py)."""
    B, H, _, D = q.shape
    Hkv, Dv, K = k_cache.shape[1], v_cache.shape[-1], selected_idx.shape[-1]
    q = _last_dim_contiguous(q)
    idx = selected_idx.to(torch.long).contiguous()
    out, lse = q.new_empty(B, H, 1, Dv), q.new_empty(B, H, 1)
    _library().dsa_sparse_fwd_f32(
        _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(idx), _ptr(out), _ptr(lse), _ptr(None),
        _longs(B, H, Hkv, 1, D, Dv, K), _strides(q), _strides(k_cache), _strides(v_cache), ctypes.c_int64(0),
        ctypes.c_int64(1), ctypes.c_int64(0), ctypes.c_int64(Hkv), ctypes.c_double(D ** -0.5 if scale is None else scale))
    return out.view(B, 1, H, Dv)  # (B, H, 1, Dv) memory is (B, 1, H, Dv) memory


def decode_available(q, k_cache, v_cache) -> bool:
    """decode_attention serves these: fp32 on CPU, the caches' last dims contiguous, no grad, the kernel built."""
    return (q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and q.shape[2] == 1
            and k_cache.stride(-1) == v_cache.stride(-1) == 1 and not torch.is_grad_enabled()
            and kernel_available(q))
