"""Low-precision lightning-indexer arithmetic: FP16/BF16 casts, FP8 e4m3, INT8/INT4 fake quantisation.

The main attention always stays FP32; only the indexer changes precision:
  fp32   reference
  fp16   the whole indexer (projections, LayerNorm, RoPE, scores) under fp16 autocast
  bf16   the same under bf16 autocast
  mixed  projections in fp32, the O(L^2) score product q.k and the head weighting in fp16
  fp8    q, k quantised to e4m3 with one power-of-two scale per vector after an orthonormal Hadamard
         rotation (DeepSeek-V3.2's recipe); w and the score accumulation stay fp32
  int8   q, k symmetric per-vector (per token and head) int8, scale = amax / 127
  int4   the same with 4 bits, scale = amax / 7
Quantisers are fake (quantise -> dequantise) with straight-through gradients, so the indexer still
trains; on CPU that measures the accuracy cost, not a speed-up.
"""
from __future__ import annotations

import contextlib
import math

import torch

from config import INDEXER_PRECISIONS
from sparse_attention import TopKTokenSelector, future_mask, index_scores, selection_mask

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
INT_LEVELS = {"int8": 127, "int4": 7}  # symmetric: codes in [-levels, levels]
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_precision(precision: str) -> None:
    if precision not in INDEXER_PRECISIONS:
        raise ValueError(f"indexer_precision={precision!r} is unknown; choose one of {', '.join(INDEXER_PRECISIONS)}")


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Value of `rounded`, gradient of the identity (straight-through estimator)."""
    return x + (rounded - x).detach()


def fake_quantize_int(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Symmetric per-row (last dim) integer quantise -> dequantise, STE gradient. x (..., d)."""
    scale = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels  # (..., 1)
    return straight_through(x, (x.detach() / scale).round().clamp(-levels, levels) * scale)


def hadamard_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix (n, n); n must be a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} must be a power of two")
    h = torch.ones(1, 1, device=device, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def fake_quantize_fp8(x: torch.Tensor) -> torch.Tensor:
    """e4m3 quantise -> dequantise with one power-of-two scale per row (last dim), STE gradient."""
    amax = x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-12)  # (..., 1)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))  # ue8m0: amax / scale <= 448
    codes = (x.detach().float() / scale).to(torch.float8_e4m3fn).to(x.dtype)
    return straight_through(x, codes * scale)


def quantize_indexer_inputs(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, precision: str):
    """q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I) -> the operands the score product sees."""
    if precision == "mixed":
        return q.half(), k.half(), w.half()
    if precision == "fp8":
        d = q.shape[-1]
        if d & (d - 1) == 0:  # rotate to spread outliers; q.k is unchanged by an orthonormal rotation
            rotation = hadamard_matrix(d, q.device, q.dtype)
            q, k = q @ rotation, k @ rotation
        return fake_quantize_fp8(q), fake_quantize_fp8(k), w
    if precision in INT_LEVELS:
        levels = INT_LEVELS[precision]
        return fake_quantize_int(q, levels), fake_quantize_int(k, levels), w
    return q, k, w  # fp32, fp16/bf16 (already low precision under autocast)


def indexer_autocast(precision: str, device_type: str):
    """Autocast context for 'fp16' / 'bf16' (whole indexer in low precision), a no-op otherwise."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def precision_index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, precision: str) -> torch.Tensor:
    """Index scores (B, Lq, L) from already-quantised operands, computed in `precision`, returned fp32."""
    with indexer_autocast(precision, q.device.type):
        return index_scores(q, k, w).float()


@torch.no_grad()
def precision_report(indexer, x: torch.Tensor, top_k: int, precisions=INDEXER_PRECISIONS) -> dict:
    """Score error and top-k agreement of each precision vs the same indexer in fp32.

    indexer: an OptimizedLightningIndexer (its `precision` is switched temporarily); x (B, L, d_model).
    Per precision: score_rel_error = ||I_p - I_32|| / ||I_32|| over causal entries, score_max_abs_error,
    topk_overlap = |S_p ∩ S_32| / |S_32| over rows that drop tokens (t+1 > k; 1.0 when there are none).
    """
    saved = indexer.precision
    try:
        indexer.precision = "fp32"
        reference = indexer(x)
        selector = TopKTokenSelector(top_k)
        L = x.shape[1]
        causal = ~future_mask(L, L, x.device)  # (L, L)
        rows = torch.arange(L, device=x.device) + 1 > top_k  # (L,)
        ref_mask = selection_mask(*selector(reference), L)  # (B, L, L)
        report = {}
        for precision in precisions:
            indexer.precision = precision
            scores = indexer(x)
            diff = (scores - reference)[:, causal]
            mask = selection_mask(*selector(scores), L)
            overlap = (mask & ref_mask)[:, rows].sum() / ref_mask[:, rows].sum().clamp_min(1)
            report[precision] = {
                "score_rel_error": float(diff.norm() / reference[:, causal].norm().clamp_min(1e-30)),
                "score_max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0,
                "topk_overlap": float(overlap) if bool(rows.any()) else 1.0,
            }
        return report
    finally:
        indexer.precision = saved
