"""Triton kernels for token-level DSA with per-head K/V (the 'triton' backend) and the fused indexer score.

Same maths as `kernels.sparse_attention_gather` (checked against the masked reference in
tests/test_kernels.py, on CPU under TRITON_INTERPRET=1). `import triton` is guarded once here: without
triton the module still imports and the backend raises one clear error.
"""
from __future__ import annotations

import os

import torch

from dsa_lab.kernels.chunked import _selected_probs
from sparse_attention import check_selection

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without triton: the backend says what is missing
    triton = tl = None


if triton is not None:
    @triton.jit
    def sparse_fwd_kernel(Q, Kt, V, IDX, O, LSE, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, si_b, si_l, H, L, K, scale,
                   BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one program per (batch, query token); heads are the tile rows
        b, t = pid // L, pid % L  # int64: offsets below do not overflow past 2^31 elements
        oh, od = tl.arange(0, BH), tl.arange(0, BD)
        hm, dm = oh < H, od < D
        q = tl.load(Q + b * sq_b + oh[:, None].to(tl.int64) * sq_h + t * sq_l + od[None, :],
                    mask=hm[:, None] & dm[None, :], other=0.0).to(tl.float32)  # (BH, BD)
        m = tl.full((BH,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BH,), tl.float32)
        acc = tl.zeros((BH, BD), tl.float32)
        for j0 in range(0, K, BK):
            oj = j0 + tl.arange(0, BK)
            idx = tl.load(IDX + b * si_b + t * si_l + oj, mask=oj < K, other=-1).to(tl.int64)  # (BK,)
            ok = idx >= 0
            kv_off = b * sk_b + oh[:, None, None].to(tl.int64) * sk_h + idx[None, :, None] * sk_l + od[None, None, :]
            kv_m = hm[:, None, None] & ok[None, :, None] & dm[None, None, :]
            kt = tl.load(Kt + kv_off, mask=kv_m, other=0.0).to(tl.float32)  # (BH, BK, BD)
            s = tl.sum(q[:, None, :] * kt, axis=2) * scale  # (BH, BK)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            vt = tl.load(V + kv_off, mask=kv_m, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt, axis=1)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(O + b * sq_b + oh[:, None].to(tl.int64) * sq_h + t * sq_l + od[None, :], out.to(O.dtype.element_ty),
                 mask=hm[:, None] & dm[None, :])
        tl.store(LSE + (b * H + oh) * L + t, m + tl.log(l_sum), mask=hm)  # (B, H, L)

    @triton.jit
    def sparse_bwd_kernel(Q, Kt, V, IDX, DO, LSE, DELTA, DQ, DK, DV, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, si_b, si_l,
                   H, L, K, scale, BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b, t = pid // L, pid % L  # int64 offsets
        oh, od = tl.arange(0, BH), tl.arange(0, BD)
        hm, dm = oh < H, od < D
        qo = b * sq_b + oh[:, None].to(tl.int64) * sq_h + t * sq_l + od[None, :]
        qm = hm[:, None] & dm[None, :]
        q = tl.load(Q + qo, mask=qm, other=0.0).to(tl.float32)  # (BH, BD)
        do = tl.load(DO + qo, mask=qm, other=0.0).to(tl.float32)
        lse = tl.load(LSE + (b * H + oh) * L + t, mask=hm, other=0.0)
        delta = tl.load(DELTA + (b * H + oh) * L + t, mask=hm, other=0.0)
        dq = tl.zeros((BH, BD), tl.float32)
        for j0 in range(0, K, BK):
            oj = j0 + tl.arange(0, BK)
            idx = tl.load(IDX + b * si_b + t * si_l + oj, mask=oj < K, other=-1).to(tl.int64)
            ok = idx >= 0
            kv_off = b * sk_b + oh[:, None, None].to(tl.int64) * sk_h + idx[None, :, None] * sk_l + od[None, None, :]
            kv_m = hm[:, None, None] & ok[None, :, None] & dm[None, None, :]
            kt = tl.load(Kt + kv_off, mask=kv_m, other=0.0).to(tl.float32)
            vt = tl.load(V + kv_off, mask=kv_m, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * kt, axis=2) * scale
            p = tl.where(ok[None, :] & hm[:, None], tl.exp(s - lse[:, None]), 0.0)  # (BH, BK)
            dp = tl.sum(do[:, None, :] * vt, axis=2)
            ds = p * (dp - delta[:, None]) * scale
            dq += tl.sum(ds[:, :, None] * kt, axis=1)
            tl.atomic_add(DK + kv_off, ds[:, :, None] * q[:, None, :], mask=kv_m, sem="relaxed")  # sums only
            tl.atomic_add(DV + kv_off, p[:, :, None] * do[:, None, :], mask=kv_m, sem="relaxed")
        tl.store(DQ + qo, dq, mask=qm)

    @triton.jit
    def indexer_scores_kernel(Q, Kt, W, S, sq_b, sq_l, sq_h, sk_b, sk_l, sw_b, sw_l, ss_b, ss_l, Lq, L, HI,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr, HALF: tl.constexpr):
        b, pm, pn = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
        om, on, od = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN), tl.arange(0, BD)  # int64 rows
        mm, nm, dm = om < Lq, on < L, od < DI
        kt = tl.load(Kt + b * sk_b + on[:, None] * sk_l + od[None, :], mask=nm[:, None] & dm[None, :],
                     other=0.0)  # (BN, BD) in the input dtype
        if not HALF:
            kt = kt.to(tl.float32)
        acc = tl.zeros((BM, BN), tl.float32)
        for j in range(0, HI):
            qj = tl.load(Q + b * sq_b + om[:, None] * sq_l + j * sq_h + od[None, :],
                         mask=mm[:, None] & dm[None, :], other=0.0)  # (BM, BD)
            wj = tl.load(W + b * sw_b + om * sw_l + j, mask=mm, other=0.0).to(tl.float32)  # (BM,)
            if HALF:  # bf16/fp16 operands on the tensor cores, fp32 accumulation
                dot = tl.dot(qj, tl.trans(kt))
            else:  # fp32 inputs: full-precision products, as the torch reference computes them
                dot = tl.dot(qj.to(tl.float32), tl.trans(kt), input_precision="ieee")
            acc += tl.maximum(dot, 0.0) * wj[:, None]
        future = on[None, :] > (om[:, None] + (L - Lq))  # queries are the last Lq of L positions
        acc = tl.where(future, float("-inf"), acc)
        tl.store(S + b * ss_b + om[:, None] * ss_l + on[None, :], acc, mask=mm[:, None] & nm[None, :])


def _triton_ready(*tensors) -> None:
    if triton is None:
        raise ValueError("attention_backend='triton' needs the triton package: pip install triton (or use 'gather')")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1, set before "
                         "triton is imported, to run the kernels on CPU); use 'gather' on CPU")


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def triton_index_scores(q, k, w, block_config=None):
    """Fused Triton `sparse_attention.index_scores`: q (B, Lq, H_I, d_I), k (B, L, d_I), w (B, Lq, H_I)
    -> (B, Lq, L) fp32 with the causal -inf mask (queries are the last Lq of L positions). bf16/fp16 q and k
    take `tl.dot` on their own dtype with fp32 accumulation and no rounding of the per-head scores (the torch
    reference rounds each product matrix to the input dtype, so scores differ in the last bf16 bits); fp32 inputs
    take IEEE fp32 products. (The FP8 indexer stays simulated in quantization_utils.)"""
    _triton_ready(q, k, w)
    B, Lq, H_I, d_I = q.shape
    L = k.shape[1]
    q, k, w = q.contiguous(), k.contiguous(), w.contiguous()
    out = torch.empty(B, Lq, L, dtype=torch.float32, device=q.device)
    tiles = {"BM": 16, "BN": 32 if q.is_cuda else 16, **(block_config or {})}
    BM, BN = tiles["BM"], tiles["BN"]
    grid = (B, -(-Lq // BM), -(-L // BN))
    indexer_scores_kernel[grid](q, k, w, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                        w.stride(0), w.stride(1), out.stride(0), out.stride(1), Lq, L, H_I,
                        BM=BM, BN=BN, BD=_pow2(d_I, 16), DI=d_I,
                        HALF=q.dtype == k.dtype and q.dtype in (torch.bfloat16, torch.float16))
    return out


def _attention_meta(q, block_config: dict | None) -> dict:
    """Tiles of the MHA kernels: BH = all heads (pow2), BK selected slots per step (16 on CUDA, 8 in the
    interpreter), BD = D padded; `block_config` forces them (tests run the CUDA tiles in the interpreter)."""
    H, D = q.shape[1], q.shape[3]  # q (B, H, L, D)
    meta = dict(BH=_pow2(H), BK=16 if q.is_cuda else 8, BD=_pow2(D, 16), D=D)
    meta.update(block_config or {})
    return meta


class _TritonSparseAttention(torch.autograd.Function):
    """The kernels read q, k, v token-major, (B, L, H, D): a selected token's rows for all heads are one
    contiguous H*D read (the kernels take strides, so any layout is correct; this one is the fast one)."""

    @staticmethod
    def forward(ctx, q, k, v, selected_idx, block_config):
        B, H, L, D = q.shape
        K = selected_idx.shape[-1]
        meta = _attention_meta(q, block_config)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, L, H, D)
        out_t = torch.empty_like(qt)
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
        sparse_fwd_kernel[(B * L,)](qt, kt, vt, selected_idx, out_t, lse, *_bhl_strides(qt), *_bhl_strides(kt),
                                    selected_idx.stride(0), selected_idx.stride(1), H, L, K, D ** -0.5, **meta)
        ctx.save_for_backward(qt, kt, vt, selected_idx, out_t, lse)
        ctx.meta = meta
        return out_t.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        qt, kt, vt, selected_idx, out_t, lse = ctx.saved_tensors
        B, L, H, D = qt.shape
        go_t = grad_out.transpose(1, 2).contiguous()  # (B, L, H, D), q's layout (the kernel reads dO with q's strides)
        delta = (go_t.float() * out_t.float()).sum(-1).transpose(1, 2).contiguous()  # (B, H, L)
        dq = torch.empty(qt.shape, dtype=torch.float32, device=qt.device)
        dk = torch.zeros(kt.shape, dtype=torch.float32, device=qt.device)
        dv = torch.zeros(vt.shape, dtype=torch.float32, device=qt.device)
        sparse_bwd_kernel[(B * L,)](qt, kt, vt, selected_idx, go_t, lse, delta, dq, dk, dv, *_bhl_strides(qt),
                                    *_bhl_strides(kt), selected_idx.stride(0), selected_idx.stride(1), H, L,
                                    selected_idx.shape[-1], D ** -0.5, **ctx.meta)
        return (dq.to(qt.dtype).transpose(1, 2), dk.to(kt.dtype).transpose(1, 2), dv.to(vt.dtype).transpose(1, 2),
                None, None)


def _bhl_strides(x_t):
    """Strides (batch, head, position) of a token-major (B, L, H, D) tensor, in the kernels' argument order."""
    return x_t.stride(0), x_t.stride(2), x_t.stride(1)


def sparse_attention_triton(q, k, v, selected_idx, valid, return_probs: bool = False, block_config=None):
    """Fused Triton token-level DSA (fwd + bwd). Same contract as `sparse_attention_gather`; `block_config`
    forces tiles, e.g. {"BK": 16} (the CUDA tile, for interpreter tests)."""
    check_selection(selected_idx, valid, q.shape[2])  # invalid = -1, valid positions in [0, L) and distinct per row
    _triton_ready(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    idx = torch.where(valid, selected_idx, -1).contiguous()
    out = _TritonSparseAttention.apply(q, k, v, idx, block_config)
    if not return_probs:
        return out, None
    with torch.no_grad():  # probs at the slots, from the same scores (for the indexer KL only)
        return out, _selected_probs(q, k, selected_idx, valid)
