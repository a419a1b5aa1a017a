"""Triton kernels for token-level sparse attention over a SHARED KV row per token (MQA mode, DSA on MLA).

Same contract and maths as `kernels.chunked_mqa.sparse_mqa_attention` (checked against the masked reference in
tests/test_mqa_kernels.py, on CPU under TRITON_INTERPRET=1). Design after FlashMLA's sparse prefill and
TileLang's sparse_mla_fwd/bwd: one program per (query token, block of heads, batch); the heads are the
M rows of `tl.dot`, the selected kv rows are gathered BLOCK_K at a time (int64 offsets) and loaded once for
the whole head block; online softmax with fp32 statistics. The row is split into its value columns
[0, v_dim) and its tail [v_dim, D) (MLA: 512 latent + 64 RoPE), each padded to a power of two >= 16.
Backward recomputes P from the saved log-sum-exp, writes dq directly, and reduces d(kv rows) over the head
block in registers (a (BLOCK_K, D) tile = ds^T q + P^T dO) before one fp32 atomic add per
(selected slot, element) per head block.

`import triton` is guarded once here: without triton the module still imports and the function raises one
clear ValueError.
"""
from __future__ import annotations

import math
import os

import torch

from dsa_lab.kernels.chunked_mqa import check_mqa_inputs

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # CPU machines without triton: the function says what is missing
    triton = tl = None
    OutOfResources = RuntimeError  # never raised without triton; keeps launch_fitting's except clause valid

LOG2E = math.log2(math.e)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ONE_CONFIG_ENV = "DSA_TRITON_ONE_CONFIG"  # "1": no autotuning on GPU, one launch config (BLOCK_K 32, 4 warps, 1 stage)
INTERPRETER_BLOCK_K = 16  # CPU interpreter default (tiny tiles; the GPU autotunes BLOCK_K over 16/32/64)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def block_h_for(H: int) -> int:
    """Heads per program: all of them padded to >= 16 (tl.dot's minimum M), at most 64 (FlashMLA's CTA)."""
    return min(64, _pow2(H))


if triton is not None:
    @triton.jit
    def _mqa_fwd_kernel(Q, KV, IDX, O, LSE, s_qb, s_ql, s_qh, s_kb, s_kl, s_ib, s_il, s_ob, s_ol, s_oh,
                        H, L, K, V_DIM, D, qk_scale,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                        BLOCK_DT: tl.constexpr, HAS_TAIL: tl.constexpr, DOT_PREC: tl.constexpr):
        t, hb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64, t64 = b.to(tl.int64), t.to(tl.int64)
        oh = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,) heads = the M rows of every dot
        hm = oh < H
        odv = tl.arange(0, BLOCK_DV)
        dvm = odv < V_DIM
        q_row = Q + b64 * s_qb + t64 * s_ql + oh[:, None].to(tl.int64) * s_qh
        qv = tl.load(q_row + odv[None, :], mask=hm[:, None] & dvm[None, :], other=0.0)  # (BLOCK_H, BLOCK_DV)
        if HAS_TAIL:
            odt = V_DIM + tl.arange(0, BLOCK_DT)
            dtm = odt < D
            qt = tl.load(q_row + odt[None, :], mask=hm[:, None] & dtm[None, :], other=0.0)  # (BLOCK_H, BLOCK_DT)
        m = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max, log2 units
        l_sum = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)
        kv_base = KV + b64 * s_kb
        idx_base = IDX + b64 * s_ib + t64 * s_il
        for j0 in range(0, K, BLOCK_K):
            oj = j0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_base + oj, mask=oj < K, other=-1)  # (BLOCK_K,) token indices, -1 invalid
            ok = idx >= 0
            rows = kv_base + idx.to(tl.int64) * s_kl  # (BLOCK_K,) row pointers: one row for all heads
            kvv = tl.load(rows[:, None] + odv[None, :], mask=ok[:, None] & dvm[None, :], other=0.0)  # (BK, BDV)
            s = tl.dot(qv, tl.trans(kvv), input_precision=DOT_PREC)  # (BLOCK_H, BLOCK_K) fp32
            if HAS_TAIL:
                kvt = tl.load(rows[:, None] + odt[None, :], mask=ok[:, None] & dtm[None, :], other=0.0)
                s = tl.dot(qt, tl.trans(kvt), acc=s, input_precision=DOT_PREC)
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid slot yet
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])  # (BLOCK_H, BLOCK_K), 0 at invalid slots
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(kvv.dtype), kvv, acc=acc * alpha[:, None], input_precision=DOT_PREC)
            m = m_new
        empty = l_sum == 0.0  # no valid slot: output 0, lse +inf (so recomputed P is 0)
        out = acc / tl.where(empty, 1.0, l_sum)[:, None]
        o_row = O + b64 * s_ob + t64 * s_ol + oh[:, None].to(tl.int64) * s_oh
        tl.store(o_row + odv[None, :], out.to(O.dtype.element_ty), mask=hm[:, None] & dvm[None, :])
        lse = tl.where(empty, float("inf"), (m + tl.log2(tl.where(empty, 1.0, l_sum))) / 1.4426950408889634)
        tl.store(LSE + (b64 * L + t64) * H + oh, lse, mask=hm)  # (B, L, H) natural-log units

    @triton.jit
    def _mqa_delta_kernel(O, DO, DELTA, R, V_DIM, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
        """delta[r] = sum_d dO[r, d] * O[r, d] over the R = B*L*H rows (contiguous (R, V_DIM))."""
        orow = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, V_DIM, BLOCK_DV):
            od = d0 + tl.arange(0, BLOCK_DV)
            msk = (orow[:, None] < R) & (od[None, :] < V_DIM)
            off = orow[:, None] * V_DIM + od[None, :]
            o = tl.load(O + off, mask=msk, other=0.0).to(tl.float32)
            do = tl.load(DO + off, mask=msk, other=0.0).to(tl.float32)
            acc += tl.sum(o * do, axis=1)
        tl.store(DELTA + orow, acc, mask=orow < R)

    @triton.jit
    def _mqa_bwd_kernel(Q, KV, IDX, DO, LSE, DELTA, DQ, DKV, s_qb, s_ql, s_qh, s_kb, s_kl, s_ib, s_il,
                        s_ob, s_ol, s_oh, H, L, K, V_DIM, D, qk_scale, scale,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                        BLOCK_DT: tl.constexpr, HAS_TAIL: tl.constexpr, DOT_PREC: tl.constexpr):
        t, hb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64, t64 = b.to(tl.int64), t.to(tl.int64)
        oh = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = oh < H
        odv = tl.arange(0, BLOCK_DV)
        dvm = odv < V_DIM
        q_row = Q + b64 * s_qb + t64 * s_ql + oh[:, None].to(tl.int64) * s_qh
        qv = tl.load(q_row + odv[None, :], mask=hm[:, None] & dvm[None, :], other=0.0)  # (BLOCK_H, BLOCK_DV)
        do_row = DO + b64 * s_ob + t64 * s_ol + oh[:, None].to(tl.int64) * s_oh
        do = tl.load(do_row + odv[None, :], mask=hm[:, None] & dvm[None, :], other=0.0)  # (BLOCK_H, BLOCK_DV)
        if HAS_TAIL:
            odt = V_DIM + tl.arange(0, BLOCK_DT)
            dtm = odt < D
            qt = tl.load(q_row + odt[None, :], mask=hm[:, None] & dtm[None, :], other=0.0)
            dq_t = tl.zeros((BLOCK_H, BLOCK_DT), tl.float32)
        stat = (b64 * L + t64) * H + oh
        lse2 = tl.load(LSE + stat, mask=hm, other=float("inf")) * 1.4426950408889634  # padded heads: P = 0
        delta = tl.load(DELTA + stat, mask=hm, other=0.0)
        dq_v = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)
        kv_base = KV + b64 * s_kb
        dkv_base = DKV + b64 * L * D  # fp32 (B, L, D) contiguous
        idx_base = IDX + b64 * s_ib + t64 * s_il
        for j0 in range(0, K, BLOCK_K):
            oj = j0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_base + oj, mask=oj < K, other=-1)
            ok = idx >= 0
            idx64 = idx.to(tl.int64)
            rows = kv_base + idx64 * s_kl
            kvv = tl.load(rows[:, None] + odv[None, :], mask=ok[:, None] & dvm[None, :], other=0.0)
            s = tl.dot(qv, tl.trans(kvv), input_precision=DOT_PREC)
            if HAS_TAIL:
                kvt = tl.load(rows[:, None] + odt[None, :], mask=ok[:, None] & dtm[None, :], other=0.0)
                s = tl.dot(qt, tl.trans(kvt), acc=s, input_precision=DOT_PREC)
            p = tl.where(ok[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # (BLOCK_H, BLOCK_K)
            dp = tl.dot(do, tl.trans(kvv), input_precision=DOT_PREC)  # (BLOCK_H, BLOCK_K)
            ds = (p * (dp - delta[:, None]) * scale).to(kvv.dtype)
            pc = p.to(kvv.dtype)
            dq_v = tl.dot(ds, kvv, acc=dq_v, input_precision=DOT_PREC)
            # d(rows) reduced over the head block in registers, then one atomic per (slot, element)
            d_rows_v = tl.dot(tl.trans(ds), qv, input_precision=DOT_PREC)  # (BLOCK_K, BLOCK_DV)
            d_rows_v = tl.dot(tl.trans(pc), do, acc=d_rows_v, input_precision=DOT_PREC)
            dst = dkv_base + idx64[:, None] * D
            tl.atomic_add(dst + odv[None, :], d_rows_v, mask=ok[:, None] & dvm[None, :], sem="relaxed")
            if HAS_TAIL:
                dq_t = tl.dot(ds, kvt, acc=dq_t, input_precision=DOT_PREC)
                d_rows_t = tl.dot(tl.trans(ds), qt, input_precision=DOT_PREC)  # (BLOCK_K, BLOCK_DT)
                tl.atomic_add(dst + odt[None, :], d_rows_t, mask=ok[:, None] & dtm[None, :], sem="relaxed")
        dq_row = DQ + b64 * s_qb + t64 * s_ql + oh[:, None].to(tl.int64) * s_qh  # dq shares q's strides
        tl.store(dq_row + odv[None, :], dq_v.to(DQ.dtype.element_ty), mask=hm[:, None] & dvm[None, :])
        if HAS_TAIL:
            tl.store(dq_row + odt[None, :], dq_t.to(DQ.dtype.element_ty), mask=hm[:, None] & dtm[None, :])

    @triton.jit
    def _mqa_probs_kernel(Q, KV, IDX, LSE, P, s_qb, s_ql, s_qh, s_kb, s_kl, s_ib, s_il, H, L, K, V_DIM, D, qk_scale,
                          BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                          BLOCK_DT: tl.constexpr, HAS_TAIL: tl.constexpr, DOT_PREC: tl.constexpr):
        """Softmax probabilities at the selected slots from the saved lse -> P (B, H, L, K), 0 at invalid."""
        t, hb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64, t64 = b.to(tl.int64), t.to(tl.int64)
        oh = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = oh < H
        odv = tl.arange(0, BLOCK_DV)
        dvm = odv < V_DIM
        q_row = Q + b64 * s_qb + t64 * s_ql + oh[:, None].to(tl.int64) * s_qh
        qv = tl.load(q_row + odv[None, :], mask=hm[:, None] & dvm[None, :], other=0.0)
        if HAS_TAIL:
            odt = V_DIM + tl.arange(0, BLOCK_DT)
            dtm = odt < D
            qt = tl.load(q_row + odt[None, :], mask=hm[:, None] & dtm[None, :], other=0.0)
        lse2 = tl.load(LSE + (b64 * L + t64) * H + oh, mask=hm, other=float("inf")) * 1.4426950408889634
        kv_base = KV + b64 * s_kb
        idx_base = IDX + b64 * s_ib + t64 * s_il
        p_row = P + ((b64 * H + oh[:, None].to(tl.int64)) * L + t64) * K  # (BLOCK_H, 1)
        for j0 in range(0, K, BLOCK_K):
            oj = j0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_base + oj, mask=oj < K, other=-1)
            ok = idx >= 0
            rows = kv_base + idx.to(tl.int64) * s_kl
            kvv = tl.load(rows[:, None] + odv[None, :], mask=ok[:, None] & dvm[None, :], other=0.0)
            s = tl.dot(qv, tl.trans(kvv), input_precision=DOT_PREC)
            if HAS_TAIL:
                kvt = tl.load(rows[:, None] + odt[None, :], mask=ok[:, None] & dtm[None, :], other=0.0)
                s = tl.dot(qt, tl.trans(kvt), acc=s, input_precision=DOT_PREC)
            p = tl.where(ok[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
            tl.store(p_row + oj[None, :], p.to(P.dtype.element_ty), mask=hm[:, None] & (oj < K)[None, :])

    def _prune(configs, named_args, **kwargs):
        """Drop BLOCK_K wider than the (padded) number of slots; keep at least one config."""
        k_pad = _pow2(named_args["K"])
        kept = [c for c in configs if c.kwargs["BLOCK_K"] <= k_pad]
        return kept or configs[:1]

    _CONFIGS = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bk in (16, 32, 64) for w in (4, 8) for s in (1, 2)]
    _KEY = ["K", "V_DIM", "D", "BLOCK_H", "DOT_PREC"]
    _mqa_fwd_tuned = triton.autotune(_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
        _mqa_fwd_kernel)
    _mqa_bwd_tuned = triton.autotune(_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                                     reset_to_zero=["DKV"])(_mqa_bwd_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_ready(q) -> None:
    if triton is None:
        raise ValueError("sparse_mqa_attention_triton needs the `triton` package (pip install triton); "
                         "use kernels.chunked_mqa.sparse_mqa_attention without it")
    if not q.is_cuda and not _interpreting():
        raise ValueError("sparse_mqa_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1, set before "
                         "this module is imported, to run the kernels on CPU); use "
                         "dsa_lab.kernels.chunked_mqa.sparse_mqa_attention on CPU")
    if q.dtype not in DTYPES:
        raise ValueError(f"sparse_mqa_attention_triton takes float16/bfloat16/float32 inputs, got {q.dtype}; "
                         "cast them, or use kernels.chunked_mqa.sparse_mqa_attention")


def _meta(q, v_dim: int, block_config: dict | None) -> tuple[dict, dict | None]:
    """Constexpr tile sizes shared by all kernels, and the forced launch config (None: autotune on GPU)."""
    H, D = q.shape[2], q.shape[3]
    cfg = dict(block_config or {})
    meta = dict(BLOCK_H=cfg.pop("BLOCK_H", block_h_for(H)), BLOCK_DV=_pow2(v_dim),
                BLOCK_DT=_pow2(max(1, D - v_dim)), HAS_TAIL=D > v_dim,
                DOT_PREC="ieee" if q.dtype == torch.float32 else None)  # exact fp32 dots (no TF32)
    if cfg or not q.is_cuda or os.environ.get(ONE_CONFIG_ENV) == "1":  # forced tiles, the interpreter, or no autotune
        cfg.setdefault("BLOCK_K", INTERPRETER_BLOCK_K if not q.is_cuda else 32)
        cfg.setdefault("num_warps", 8 if meta["BLOCK_H"] * meta["BLOCK_DV"] >= 16384 else 4)  # big MLA tiles
        cfg.setdefault("num_stages", 1)
        return meta, cfg
    return meta, None


def launch_fitting(kernel, shape: tuple, args: tuple, meta: dict, forced: dict | None) -> None:
    """Launch over the grid (L, H / BLOCK_H, B) = shape's; when the tiles need more shared memory than the GPU has
    (Triton's OutOfResources, raised before the kernel runs: seen on an H200 for the MLA backward at D 576 / H 128),
    halve BLOCK_H, then BLOCK_K (forced configs), down to 16, and launch again."""
    L, H, B = shape
    while True:
        try:
            kernel[(L, triton.cdiv(H, meta["BLOCK_H"]), B)](*args, **meta, **(forced or {}))
            return
        except OutOfResources:
            if meta["BLOCK_H"] > 16:
                meta = {**meta, "BLOCK_H": meta["BLOCK_H"] // 2}
            elif forced is not None and forced.get("BLOCK_K", 16) > 16:
                forced = {**forced, "BLOCK_K": forced["BLOCK_K"] // 2}
            else:
                raise


def _strides(q, kv, idx, out):
    return (q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), idx.stride(0), idx.stride(1),
            out.stride(0), out.stride(1), out.stride(2))


class _TritonSparseMQA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, idx, v_dim, scale, block_config):
        B, L, H, D = q.shape
        K = idx.shape[-1]
        meta, forced = _meta(q, v_dim, block_config)
        out = q.new_empty(B, L, H, v_dim)
        lse = torch.empty(B, L, H, dtype=torch.float32, device=q.device)
        args = (q, kv, idx, out, lse, *_strides(q, kv, idx, out), H, L, K, v_dim, D, scale * LOG2E)
        launch_fitting(_mqa_fwd_tuned if forced is None else _mqa_fwd_kernel, (L, H, B), args, meta, forced)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.args = (v_dim, scale, block_config)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, kv, idx, out, lse = ctx.saved_tensors
        v_dim, scale, block_config = ctx.args
        B, L, H, D = q.shape
        K = idx.shape[-1]
        meta, forced = _meta(q, v_dim, block_config)
        grad_out = grad_out.contiguous()
        delta = torch.empty(B, L, H, dtype=torch.float32, device=q.device)
        R = B * L * H
        block_dv = min(_pow2(v_dim), 256)
        block_r = max(16, 4096 // block_dv)
        _mqa_delta_kernel[(triton.cdiv(R, block_r),)](out, grad_out, delta, R, v_dim, BLOCK_R=block_r,
                                                       BLOCK_DV=block_dv)
        dq = torch.empty_like(q)
        dkv = torch.zeros(B, L, D, dtype=torch.float32, device=q.device)
        args = (q, kv, idx, grad_out, lse, delta, dq, dkv, *_strides(q, kv, idx, grad_out), H, L, K, v_dim, D,
                scale * LOG2E, scale)
        launch_fitting(_mqa_bwd_tuned if forced is None else _mqa_bwd_kernel, (L, H, B), args, meta, forced)
        return dq, dkv.to(kv.dtype), None, None, None, None


@torch.no_grad()
def _selected_probs(q, kv, idx, lse, v_dim: int, scale: float, block_config):
    B, L, H, D = q.shape
    K = idx.shape[-1]
    meta, forced = _meta(q, v_dim, block_config)
    forced = forced or {"BLOCK_K": 64 if K > 32 else 32, "num_warps": 4, "num_stages": 2}
    probs = q.new_empty(B, H, L, K, dtype=torch.promote_types(q.dtype, torch.float32))  # fp32 for half q
    args = (q, kv, idx, lse, probs, *_strides(q, kv, idx, q)[:7], H, L, K, v_dim, D, scale * LOG2E)
    launch_fitting(_mqa_probs_kernel, (L, H, B), args, meta, forced)
    return probs


def sparse_mqa_attention_triton(q, kv, selected_idx, valid, *, v_dim: int, scale=None, return_probs: bool = False,
                                block_config: dict | None = None):
    """Fused Triton sparse MQA attention (fwd + bwd). Same contract as `kernels.chunked_mqa.sparse_mqa_attention`:
    q (B, L, H, D), kv (B, L, D), selected_idx/valid (B, L, K) -> out (B, L, H, v_dim), probs (B, H, L, K)
    (detached, 0 at invalid slots; fp32 for half inputs) or None. fp16/bf16/fp32 inputs, fp32 statistics and dkv
    accumulation.

    `block_config` forces the tiles, e.g. {"BLOCK_H": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2}
    (tests, benchmarks); by default BLOCK_H = min(64, pow2(H) >= 16) and, on GPU, BLOCK_K / num_warps /
    num_stages are autotuned per (K, v_dim, D, BLOCK_H, precision).
    """
    check_mqa_inputs(q, kv, selected_idx, valid, v_dim)  # shapes, dtypes, the selection contract
    _check_ready(q)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    q, kv = q.contiguous(), kv.contiguous()
    idx = torch.where(valid, selected_idx, -1).to(torch.int32).contiguous()  # (B, L, K), -1 invalid
    out, lse = _TritonSparseMQA.apply(q, kv, idx, v_dim, scale, block_config)
    if not return_probs:
        return out, None
    return out, _selected_probs(q.detach(), kv.detach(), idx, lse, v_dim, scale, block_config)
