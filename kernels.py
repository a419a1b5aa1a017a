"""Faster sparse-attention paths. Each one is checked against `sparse_attention.sparse_attention_masked`
(outputs and gradients) in tests/test_kernels.py.
"""
from __future__ import annotations

import torch

GATHER_CHUNK_ELEMENTS = 1 << 24  # bound on the gathered K (or V) elements held at once (64 MiB fp32)


def sparse_attention_gather(q, k, v, selected_idx, valid, return_probs: bool = False):
    """Token-level DSA touching only the selected keys: gather K/V rows at S_t, softmax over K slots.

    q, k, v (B, H, L, D); selected_idx, valid (B, L, K) -> out (B, H, L, D), probs (B, H, L, K) or None.
    Queries are processed in chunks so the gathered (B, H, chunk, K, D) tensors stay bounded.
    """
    B, H, L, D = q.shape
    K = selected_idx.shape[-1]
    chunk = max(1, min(L, GATHER_CHUNK_ELEMENTS // max(1, B * H * K * D)))
    safe_idx = selected_idx.clamp(min=0)
    outs, probs_all = [], []
    for start in range(0, L, chunk):
        stop = min(L, start + chunk)
        c = stop - start
        rows = safe_idx[:, start:stop].reshape(B, 1, c * K, 1).expand(B, H, c * K, D)
        k_sel = k.gather(2, rows).view(B, H, c, K, D)
        v_sel = v.gather(2, rows).view(B, H, c, K, D)
        scores = torch.einsum("bhcd,bhckd->bhck", q[:, :, start:stop], k_sel) * D ** -0.5
        probs = scores.masked_fill(~valid[:, None, start:stop], float("-inf")).softmax(-1)  # (B, H, c, K)
        outs.append(torch.einsum("bhck,bhckd->bhcd", probs, v_sel))
        if return_probs:
            probs_all.append(probs)
    out = torch.cat(outs, dim=2)
    return out, (torch.cat(probs_all, dim=2) if return_probs else None)


SPARSE_BACKENDS = {"gather": sparse_attention_gather}
