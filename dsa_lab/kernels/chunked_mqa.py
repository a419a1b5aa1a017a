"""Token-level sparse attention over a SHARED KV row per token (MQA mode, as DeepSeek-V3.2 runs DSA on MLA).

Every query token t attends, with all H query heads, to the same selected tokens S_t; each token has ONE
kv row shared by all heads: keys are kv[..., :D], values kv[..., :v_dim] (in MLA's MQA mode the value is
the latent part of the same row, the last D - v_dim columns are the decoupled RoPE key). A selected row is
therefore gathered once for all heads and the heads become the rows of one matmul per query.

  sparse_attention.sparse_mqa_attention_masked  the masked reference (kv expanded to every head)
  sparse_mqa_attention            chunked torch path (CPU and GPU), custom autograd, fp32 statistics
  triton_mqa.sparse_mqa_attention_triton   fused Triton kernels (GPU)

Shapes: q (B, L, H, D); kv (B, L, D); selected_idx (B, L, K) long (-1 = invalid); valid (B, L, K) bool
-> out (B, L, H, v_dim), selected_probs (B, H, L, K) (detached; 0 at invalid slots; fp32 for half inputs) or None.
Valid slots of a row must name distinct tokens (top-k selections do). A row with no valid slot gives 0.
"""
from __future__ import annotations

import torch

from dsa_lab.kernels.chunked import run_chunks
from sparse_attention import check_selection
from dsa_lab.common.work_sizes import chunk_bounds as _chunk_bounds
from dsa_lab.common.work_sizes import query_chunk, work_budget


def check_mqa_inputs(q, kv, selected_idx, valid, v_dim: int) -> None:
    """Raise ValueError naming the bad argument and the fix."""
    if q.dim() != 4 or kv.dim() != 3:
        raise ValueError(f"q must be (B, L, H, D) and kv (B, L, D); got q {tuple(q.shape)}, kv {tuple(kv.shape)}")
    B, L, H, D = q.shape
    if kv.shape != (B, L, D):
        raise ValueError(f"kv must be (B, L, D) = {(B, L, D)} to match q {tuple(q.shape)}; got {tuple(kv.shape)}")
    if selected_idx.dim() != 3 or selected_idx.shape[:2] != (B, L) or valid.shape != selected_idx.shape:
        raise ValueError(f"selected_idx and valid must both be (B, L, K) with (B, L) = {(B, L)}; got "
                         f"{tuple(selected_idx.shape)} and {tuple(valid.shape)}")
    if valid.dtype != torch.bool or selected_idx.dtype not in (torch.long, torch.int32):
        raise ValueError(f"valid must be bool and selected_idx long; got {valid.dtype}, {selected_idx.dtype}")
    if not 0 < v_dim <= D:
        raise ValueError(f"v_dim={v_dim} must be in [1, D={D}] (values are kv[..., :v_dim])")
    if q.dtype != kv.dtype:
        raise ValueError(f"q and kv must share a dtype; got {q.dtype} and {kv.dtype}")
    check_selection(selected_idx, valid, L)  # invalid = -1, valid positions in [0, L) and distinct per row


def mqa_chunk(B: int, L: int, H: int, K: int, D: int, device) -> int:
    """Queries per chunk: the gathered rows (B, c, K, D) and the scores (B, c, H, K) within the 'mqa' budget
    (dsa_lab/common/work_sizes.py)."""
    return query_chunk(L, B * K * max(D, H), work_budget(device, "mqa"))


def _scale(scale, D: int) -> float:
    return D ** -0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------- chunked torch path
def _rows(selected_idx, valid, L: int, start: int, stop: int) -> torch.Tensor:
    """Token indices of queries [start, stop) -> row numbers into the flattened (B*L, D) kv table,
    invalid slots -> row 0 of their batch (a harmless finite row: its probability is forced to 0)."""
    B = selected_idx.shape[0]
    base = (torch.arange(B, device=selected_idx.device) * L).view(B, 1, 1)
    return (base + torch.where(valid[:, start:stop], selected_idx[:, start:stop], 0)).reshape(-1)


class _SparseMQA(torch.autograd.Function):
    """Forward saves q, kv, the selection, out and the fp32 log-sum-exp (B, L, H); backward recomputes
    scores per chunk. Nothing of size (B, H, L, K) or (B, L, K, D) is kept between chunks."""

    @staticmethod
    def forward(ctx, q, kv, selected_idx, valid, v_dim, scale, return_probs, chunk):
        B, L, H, D = q.shape
        K = selected_idx.shape[-1]
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax statistics in fp32 for half inputs
        kvf = kv.reshape(B * L, D)
        out = q.new_empty(B, L, H, v_dim)
        lse = torch.empty(B, L, H, dtype=acc, device=q.device)
        probs = q.new_zeros(B, H, L, K, dtype=acc) if return_probs else None  # fp32, as the masked path's

        def forward_chunks(share):  # writes the share's rows of out, lse, probs
            buf = q.new_empty(B * chunk * K, D)
            for start, stop in share:
                c = stop - start
                rows = _rows(selected_idx, valid, L, start, stop)
                # the selected rows, gathered once for all heads: (B, c, K, D)
                rows_kv = torch.index_select(kvf, 0, rows, out=buf[:rows.numel()]).view(B, c, K, D)
                ok = valid[:, start:stop, None, :]  # (B, c, 1, K)
                scores = (q[:, start:stop] @ rows_kv.transpose(-1, -2)).to(acc) * scale  # (B, c, H, K)
                scores.masked_fill_(~ok, float("-inf"))
                lse_c = scores.logsumexp(-1)  # (B, c, H); -inf on empty rows
                lse_c = lse_c.masked_fill(lse_c == float("-inf"), float("inf"))  # empty rows: p = exp(-inf) = 0
                p = (scores - lse_c[..., None]).exp_()  # (B, c, H, K) fp32, 0 at invalid slots
                out[:, start:stop] = p.to(q.dtype) @ rows_kv[..., :v_dim]
                lse[:, start:stop] = lse_c
                if return_probs:
                    probs[:, :, start:stop] = p.transpose(1, 2)

        run_chunks(forward_chunks, _chunk_bounds(L, chunk), q.device)
        ctx.save_for_backward(q, kv, selected_idx, valid, out, lse)
        ctx.args = (v_dim, scale, chunk)
        if probs is not None:
            ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        q, kv, selected_idx, valid, out, lse = ctx.saved_tensors
        v_dim, scale, chunk = ctx.args
        B, L, H, D = q.shape
        K = selected_idx.shape[-1]
        acc = lse.dtype
        grad_out = grad_out.contiguous()
        kvf = kv.reshape(B * L, D)
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None

        def backward_chunks(share):  # writes the share's rows of dq; returns its own dkv accumulator
            dkv = torch.zeros(B * L, D, dtype=acc, device=q.device)  # accumulated in fp32 (fp64 for fp64)
            buf = q.new_empty(B * chunk * K, D)
            q_do = q.new_zeros(B, chunk, 2 * H, D)  # per query [q ; dO padded to D]: scores and dP in one matmul
            for start, stop in share:
                c = stop - start
                rows = _rows(selected_idx, valid, L, start, stop)
                rows_kv = torch.index_select(kvf, 0, rows, out=buf[:rows.numel()]).view(B, c, K, D)
                q_do_c = q_do[:, :c]
                q_do_c[:, :, :H] = q[:, start:stop]
                q_do_c[:, :, H:, :v_dim] = do_c = grad_out[:, start:stop]  # (B, c, H, v_dim)
                delta = (do_c.to(acc) * out[:, start:stop].to(acc)).sum(-1, keepdim=True)  # (B, c, H, 1)
                scores_dp = (q_do_c @ rows_kv.transpose(-1, -2)).to(acc)  # (B, c, 2H, K)
                p = (scores_dp[:, :, :H] * scale - lse[:, start:stop, :, None]).exp_()  # (B, c, H, K)
                p.masked_fill_(~valid[:, start:stop, None, :], 0.0)
                ds = p * (scores_dp[:, :, H:] - delta) * scale
                ds_p = torch.cat([ds, p], dim=2).to(q.dtype)  # (B, c, 2H, K)
                if dq is not None:
                    dq[:, start:stop] = ds_p[:, :, :H] @ rows_kv
                # d(gathered rows) = ds^T q + P^T [dO ; 0], summed over heads by the matmul: (B, c, K, D),
                # then one index_add per selected slot (not per head)
                d_rows = ds_p.transpose(-1, -2) @ q_do_c
                dkv.index_add_(0, rows, d_rows.view(-1, D).to(acc))
            return dkv

        parts = run_chunks(backward_chunks, _chunk_bounds(L, chunk), q.device)
        return dq, sum(parts[1:], parts[0]).view_as(kv).to(kv.dtype), None, None, None, None, None, None


def sparse_mqa_attention(q, kv, selected_idx, valid, *, v_dim: int, scale=None, return_probs: bool = False,
                         chunk: int | None = None):
    """Sparse MQA attention touching only the selected rows, chunked over queries (CPU and GPU).

    q (B, L, H, D), kv (B, L, D), selected_idx/valid (B, L, K) -> out (B, L, H, v_dim),
    probs (B, H, L, K) at the selected slots (detached, 0 at invalid) or None. `chunk` (queries per chunk)
    defaults to `mqa_chunk` (the device's work budget, dsa_lab/common/work_sizes.py).
    """
    check_mqa_inputs(q, kv, selected_idx, valid, v_dim)
    B, L, H, D = q.shape
    K = selected_idx.shape[-1]
    chunk = min(L, chunk or mqa_chunk(B, L, H, K, D, q.device))
    out, probs = _SparseMQA.apply(q.contiguous(), kv.contiguous(), selected_idx, valid, v_dim,
                                  _scale(scale, D), return_probs, chunk)
    return out, probs
