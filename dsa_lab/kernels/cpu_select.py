"""chunked_select's CPU path after the per-head GEMM, fused in C++ (`cpu_select.cpp`, built like cpu_sparse.cpp by
dsa_lab/kernels/cpp_build.py): per query row, the head-weighted ReLU sum of its per-head scores over its allowed keys
and their top-K in the reference's order (descending score as float32, ties toward the most recent key), written
straight into the selection — instead of ~10 torch passes over the chunk's (c, S) scores (ReLU, head weights, the
future mask, the block-max prefilter, int64 keys, two top-ks). The torch path in `chunked._select_chunks` is its
reference twin (tests/test_cpu_select.py: the same positions, order and validity, ties included).

  fused_available(per_head, w)   the kernel serves these dtypes (fp32 or fp64 scores; bf16 GEMM output with fp32
                                 weights) on CPU outside a torch.compile trace, and is built
  select_rows(per_head, w, start, selected_idx, valid, kept)
      per_head (B, c, H_I, S) contiguous, w (B, c, H_I) of the queries at positions start .. start + c - 1 ->
      selected_idx (B, c, K) (int64, -1 invalid) and valid (B, c, K) (bool) written (views whose rows are contiguous,
      e.g. rows [start, start + c) of a (B, L, K) selection): row t's top-K keys among s in [sinks, t - window]
      (kept = (sinks, window); (0, 0): every past key), descending
  scoring_available(q, w) / score_rows(q, k_t, w, start, selected_idx, valid, kept)
      prefill with the GEMM fused in too (fp32; x86 with AVX2 + FMA): q (B, c, H_I, d_I), w (B, c, H_I) of the
      queries start .. start + c - 1, k_t (B, d_I, S) the keys transposed -> the selection as select_rows writes
      it. Each per-head dot product is one FMA chain over d = 0 .. d_I - 1 in vector lanes over keys, the order in
      which MKL's sgemm sums it on x86 (up to 128 products), so the scores carry the GEMM's bits there; the check
      (gemm_sums_in_order) runs once per width, and where it fails the GEMM path stays (tests/test_cpu_select.py);
      ReLU, weights and top-K as select_rows. No (c, H_I, S) per-head scores: ~1.4x faster at L 8192 (benchmarks.md)
  decode_available(q, k, w, index_dtype) / decode_row(q, k, w, top_k, kept)
      a cached decode step's one new row with its GEMM fused too: q (B, 1, H_I, d_I) of the query at the last of the
      T cached keys k (B, T, d_I) (fp32, or bf16 with index_dtype bf16: q rounded to bf16 and each per-head score
      to bf16, as chunked_select's bf16 GEMM), w (B, 1, H_I) -> (selected_idx, valid) (B, 1, K), K = min(top_k, T),
      no (H_I, T) score tensor; a NaN score or weight refused as check_no_nan does. The per-head sums run in 8
      lanes (FMA on x86 with AVX2), not in the GEMM's order: scores equal to fp32 rounding, so the selection equals
      select_last_rows' torch passes wherever no two candidate scores lie within it (tests/test_cpu_select.py)
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from dsa_lab.kernels.cpp_build import CppKernel, longs, ptr
from sparse_attention import NAN_SCORES

KERNEL = CppKernel(Path(__file__).with_name("cpu_select.cpp"), "chunked selection takes its torch path")
_TYPES = {(torch.float32, torch.float32): "f32", (torch.float64, torch.float64): "f64",
          (torch.bfloat16, torch.float32): "bf16"}  # (per-head scores, head weights) -> the kernel's entry


def fused_available(per_head: torch.Tensor, w: torch.Tensor) -> bool:
    """The kernel serves these per-head scores and head weights (see the module docstring)."""
    return (per_head.device.type == "cpu" and (per_head.dtype, w.dtype) in _TYPES
            and not torch.compiler.is_compiling() and KERNEL.library() is not None)


def select_rows(per_head, w, start: int, selected_idx, valid, kept: tuple = (0, 0)) -> None:
    """See the module docstring. One call per chunk (run on run_chunks' worker threads: ctypes drops the GIL)."""
    B, c, H_I, S = per_head.shape
    K = selected_idx.shape[-1]
    assert per_head.is_contiguous() and S >= start + c and selected_idx.shape == valid.shape == (B, c, K)
    assert selected_idx.dtype == torch.long and valid.dtype == torch.bool
    assert selected_idx.stride()[1:] == valid.stride()[1:] == (K, 1) and selected_idx.stride(0) == valid.stride(0)
    w = w.contiguous()
    fn = getattr(KERNEL.library(), f"dsa_select_{_TYPES[(per_head.dtype, w.dtype)]}")
    dims = longs(B, c, H_I, S, K, start, *kept, selected_idx.stride(0))
    fn(ptr(per_head), ptr(w), ptr(selected_idx), ptr(valid), dims)


def scoring_available(q: torch.Tensor, w: torch.Tensor) -> bool:
    """score_rows serves these fp32 CPU queries (..., d_I) and weights (the kernel built with AVX2 + FMA: x86)."""
    return (q.device.type == "cpu" and q.dtype == w.dtype == torch.float32 and not torch.compiler.is_compiling()
            and KERNEL.library() is not None and _fused_lanes(q.shape[-1]) > 0)


def _fused_lanes(d_I: int) -> int:
    """Keys per vector of the library's fused scoring; 0 where it is not built for this CPU or where torch's GEMM
    does not sum d_I products as it does (gemm_sums_in_order, checked once per width: MKL sums 256 or more in
    blocks here): then chunked_select keeps the GEMM, so no selection changes."""
    if ("lanes", d_I) not in _ENTRIES:
        fn = KERNEL.library().dsa_fused_lanes
        fn.restype = ctypes.c_int64
        lanes = fn()
        _ENTRIES["lanes", d_I] = lanes if lanes and gemm_sums_in_order(d_I=d_I) else 0
    return _ENTRIES["lanes", d_I]


def gemm_sums_in_order(rows: int = 64, d_I: int = 64, keys: int = 300) -> bool:
    """Whether torch's fp32 GEMM (chunked_select's per-head bmm) gives each dot product the bits of one FMA chain
    over d = 0 .. d_I - 1, the fused scoring's sums: checked on random inputs of the scoring's shapes (MKL on the
    AMD EPYC Zen 4 where it was written: yes for d_I <= 128, no from 256 on, where it sums in blocks)."""
    g = torch.Generator().manual_seed(0)
    q, k_t = torch.randn(1, rows, d_I, generator=g), torch.randn(1, d_I, keys, generator=g)
    out = torch.empty(rows, keys)
    KERNEL.library().dsa_head_dots_f32(ptr(q), ptr(k_t), ptr(out), longs(rows, d_I, keys))
    return torch.equal(torch.bmm(q, k_t)[0], out)


def score_rows(q, k_t, w, start: int, selected_idx, valid, kept: tuple = (0, 0)) -> None:
    """See the module docstring. q (B, c, H_I, d_I) and w (B, c, H_I) with contiguous rows, k_t (B, d_I, S)
    with contiguous rows of S keys. One call per chunk (run_chunks' worker threads: ctypes drops the GIL)."""
    B, c, H_I, d_I = q.shape
    S, K = k_t.shape[-1], selected_idx.shape[-1]
    assert q.stride()[1:] == (H_I * d_I, d_I, 1) and w.stride()[1:] == (H_I, 1) and (k_t.stride(-1) == 1 or S == 1)
    assert S >= start + c and selected_idx.shape == valid.shape == (B, c, K) and selected_idx.dtype == torch.long
    assert selected_idx.stride()[1:] == valid.stride()[1:] == (K, 1) and selected_idx.stride(0) == valid.stride(0)
    dims = longs(B, c, H_I, d_I, S, K, start, *kept, selected_idx.stride(0), q.stride(0), k_t.stride(0),
                 k_t.stride(1), w.stride(0))
    KERNEL.library().dsa_score_select_f32(ptr(q), ptr(k_t), ptr(w), ptr(selected_idx), ptr(valid), dims)


_ENTRIES = {}  # kind -> the decode-row entry point (_decode_entry); ("lanes", d_I) -> _fused_lanes(d_I)
_KEY_TYPES = {(torch.float32, None): "f32", (torch.bfloat16, torch.bfloat16): "bf16"}  # (k, index_dtype) -> entry


def decode_available(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, index_dtype=None) -> bool:
    """decode_row serves one fp32 query row over an fp32 key cache, or a bf16 one read with index_dtype bf16."""
    return (q.device.type == "cpu" and q.shape[1] == 1 and q.dtype == w.dtype == torch.float32
            and (k.dtype, index_dtype) in _KEY_TYPES and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1]
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and KERNEL.library() is not None)


def _decode_entry(kind: str):
    """The library's dsa_decode_row_<kind>, returning int64 (looked up once: a decode step calls it per layer)."""
    if kind not in _ENTRIES:
        _ENTRIES[kind] = fn = getattr(KERNEL.library(), f"dsa_decode_row_{kind}")
        fn.restype = ctypes.c_int64
    return _ENTRIES[kind]


def decode_row(q, k, w, top_k: int, kept: tuple = (0, 0), index_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. One thread: a second one, started per call, measured slower (torch's OpenMP
    workers spin on the other core between ops)."""
    B, _, H_I, d_I = q.shape
    T, K = k.shape[1], min(top_k, k.shape[1])
    if index_dtype is not None:
        q = q.to(index_dtype).float()  # the bf16 GEMM's rounded query
    q, w = q.contiguous(), w.contiguous()
    selected_idx = torch.empty(B, 1, K, dtype=torch.long)
    valid = torch.empty(B, 1, K, dtype=torch.bool)
    fn = _decode_entry(_KEY_TYPES[(k.dtype, index_dtype)])
    if fn(ptr(q), ptr(k), ptr(w), ptr(selected_idx), ptr(valid), longs(B, H_I, d_I, T, K, *kept, k.stride(0))):
        raise ValueError(NAN_SCORES)
    return selected_idx, valid
