"""Faster sparse-attention paths. Each one is checked against `sparse_attention.sparse_attention_masked`
(outputs and gradients) in tests/test_kernels.py.

Backends (config.ATTENTION_BACKENDS; the classes that combine these paths are in dsa_lab/kernels/backends.py):
  gather  token-level DSA over exactly the selected tokens; a custom autograd Function that walks
          query chunks sized by dsa_lab/common/work_sizes.py (cache on CPU, memory on GPU), recomputes them in backward
          and scatter-adds dK/dV (never a (L, K, D) tensor).
  triton  the same maths as fused Triton kernels (dsa_lab/kernels/triton_mha.py).
  block   our query-block-shared variant (a different model): the Bq queries of a block share one
          set of k past tokens, chosen by a pooled block query of the *previous* block, plus exact
          causal attention inside their own block; dense batched matmuls, no per-token gathers.
  flex    the block model through FlexAttention with a BlockMask (GPU; CPU forward only).
Selection for every fast backend is chunked over queries (`chunked_select`): no L x L tensor.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dsa_lab.kernels import cpu_select
from sparse_attention import certify_selection, check_no_nan, check_selection, index_scores, select_top_k
from dsa_lab.common.work_sizes import chunk_bounds as _chunk_bounds
from dsa_lab.common.work_sizes import prefix_bounds, query_chunk as _query_chunk, work_budget

MAX_CPU_WORKERS = 8  # CPU: at most this many Python threads share a chunk loop (run_chunks; measured on 2 cores only)
MIN_PARALLEL_CHUNKS = 16  # fewer chunks run on one thread (a quick-width MLA step at L=256, 6 chunks per call: 2
#                           workers made the call 2x slower, 47 vs 38 ms per training step)
FUSED_SELECT = True  # CPU: chunked_select ranks through cpu_select's C++ pass where it serves (False: the torch twin)
SELECT_BLOCK = 8  # keys per block of chunked selection's exact block-max prefilter (_chunk_top_k)
BLOCK_SIZE = 64  # default query block of the 'block' backend
FLEX_MIN_HEAD_DIM = 16  # flex_attention refuses a smaller head dim on CUDA ("NYI: embedding dimension ... at least 16")


# ----------------------------------------------------------------------------- chunk plans (dsa_lab/common/work_sizes.py budgets)
def selection_bounds(B: int, L: int, H_I: int, device) -> list:
    """chunked_select's query chunks: each chunk's per-head scores (B, c * H_I, stop) within the 'index' budget,
    every stop but L on a multiple of SELECT_BLOCK (no short last block for _chunk_top_k's prefilter)."""
    return prefix_bounds(L, B * H_I, work_budget(device, "index"), SELECT_BLOCK)


def gather_chunk(B: int, H: int, L: int, K: int, D: int, device) -> int:
    """Queries per chunk of the MHA gather path (forward, backward, slot probabilities): gathered K (or V)
    (B, c, H, K, D) within the 'gather' budget."""
    return _query_chunk(L, B * H * K * D, work_budget(device, "gather"))


def selected_scores_chunk(B: int, L: int, K: int, H_I: int, d_I: int, device) -> int:
    """Queries per chunk of `selected_index_scores`: (B, c, K, d_I + H_I) within the 'selected_scores' budget."""
    return _query_chunk(L, B * K * (d_I + H_I), work_budget(device, "selected_scores"))


# ----------------------------------------------------------------------------- chunked indexer + top-k


@torch.no_grad()
def chunked_select(q, k, w, top_k: int, score_fn=None, chunk: int | None = None, index_dtype=None,
                   kept: tuple = (0, 0)):
    """Causal top-k selection over query chunks: the same set as TopKTokenSelector(index_scores(q, k, w)).

    q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I) -> selected_idx (B, L, K) (-1 invalid), valid (B, L, K),
    K = min(top_k, L). A chunk of queries [start, stop) scores only the keys [0, stop) (never the future half),
    so only one (B, chunk, stop) block of scores exists at a time: memory is linear in L. No host
    synchronisation per chunk. `chunk` fixes the queries per chunk; by default each chunk's per-head scores
    (B, chunk * H_I, stop) fill the 'index' work budget (dsa_lab/common/work_sizes.py: L2-sized on CPU, memory on GPU), so
    early chunks, with short key prefixes, hold more queries; on CPU they run on `run_chunks`' worker threads.
    `score_fn(q_chunk, k_prefix, w_chunk)` replaces the
    fused torch scoring (`index_scores` maths; the Triton backend passes its kernel).
    `index_dtype=torch.bfloat16` (CPU or CUDA, fp32 inputs): the per-head q.k GEMM runs on bf16-rounded q and k
    (2.2x the fp32 GEMM rate on an AVX512-BF16 CPU), ReLU, the head weights and top-k stay fp32 — a cheaper
    indexer whose sets differ from fp32's only where scores tie within bf16 rounding (docs/benchmarks.md measures
    the overlap and the recall change).
    `kept` = (sinks, window): the keys a structured row keeps anyway (`kept_keys`: s < sinks or t - window < s <= t)
    are left out of its top-K (fewer remaining keys: -1 slots). On CPU (fp32/fp64 scores, or the bf16 GEMM) the
    scores after the GEMM are summed and ranked in one C++ pass per row (`cpu_select`); fp32 on x86 runs the GEMM
    inside that pass too where its sums carry the GEMM's bits (`cpu_select.score_rows`); the torch passes here are
    the reference twin and the path everywhere else.
    """
    B, L, H_I, _ = q.shape
    K = min(top_k, L)
    check_no_nan(q, k, w)  # one check per call, not per chunk (finite inputs give finite or masked scores)
    dtype = score_dtype(q, k, w)  # one explicit dtype for the score buffers (CUDA autocast: fp32 k, bf16 q and w)
    q, k, w = q.to(dtype), k.to(dtype), w.to(dtype)
    selected_idx = torch.full((B, L, K), -1, dtype=torch.long, device=q.device)
    valid = torch.zeros(B, L, K, dtype=torch.bool, device=q.device)
    k_t = k.transpose(1, 2)  # (B, d_I, L)
    bounds = _chunk_bounds(L, chunk) if chunk else selection_bounds(B, L, H_I, q.device)
    low = None
    if index_dtype is not None and index_dtype != dtype:
        if score_fn is not None:
            raise ValueError("chunked_select: index_dtype and score_fn are exclusive (score_fn computes its own dtype)")
        low = (q.to(index_dtype), k_t.to(index_dtype).contiguous())  # (B, L, H_I, d_I), (B, d_I, L) rows for the GEMM
    if score_fn is None and low is None and FUSED_SELECT and cpu_select.scoring_available(q, w):  # GEMM fused in
        q, w, k_t = q.contiguous(), w.contiguous(), k_t.contiguous()  # rows as cpu_select.score_rows reads them
        work = lambda share: [cpu_select.score_rows(q[:, a:b], k_t[:, :, :b], w[:, a:b], a, selected_idx[:, a:b],
                                                    valid[:, a:b], kept) for a, b in share]
    else:
        work = lambda share: _select_chunks(q, k_t, k, w, K, score_fn, selected_idx, valid, share, low, kept)
    run_chunks(work, bounds, q.device)
    return certify_selection(selected_idx, valid), valid  # distinct top-k positions, -1 exactly at invalid slots


@torch.no_grad()
def select_last_rows(q, k, w, top_k: int, kept: tuple = (0, 0), index_dtype=None):
    """chunked_select's last Lq rows (the new tokens of a cached decode step): q (B, Lq, H_I, d_I) at the last Lq of
    the L positions of k (B, L, d_I), w (B, Lq, H_I) -> selected_idx (B, Lq, K) (-1 invalid), valid; K = min(top_k, L).
    index_dtype=torch.bfloat16: chunked_select's bf16 GEMM (q and k rounded; a bf16 key cache is read as it is), the
    rest in q and w's dtype. On CPU one row (Lq 1) runs in one C++ call, GEMM included (`cpu_select.decode_row`);
    more rows: the fused C++ pass ranks the GEMM's per-head scores; elsewhere the torch passes (`index_scores`, or
    for the bf16 GEMM `_causal_prefix_scores`) + `select_top_k` (the twin)."""
    B, Lq, H_I, d_I = q.shape
    L, K = k.shape[1], min(top_k, k.shape[1])
    if FUSED_SELECT and cpu_select.decode_available(q, k, w, index_dtype):  # one row: the GEMM fused in too
        selected_idx, valid = cpu_select.decode_row(q, k, w, top_k, kept, index_dtype)
        return certify_selection(selected_idx, valid), valid
    dtype = score_dtype(q, k if index_dtype is None else q, w)  # a bf16 key cache leaves the scores' dtype to q, w
    gemm = dtype if index_dtype is None else index_dtype
    q, w = q.to(dtype), w.to(dtype)
    per_head = _last_rows_gemm(q.to(gemm).reshape(B, Lq * H_I, d_I), k.to(gemm)).view(B, Lq, H_I, L)
    check_no_nan(per_head, w)  # a NaN in q or any cached key shows here: one (Lq, H_I, L) check, not one of all of k
    if FUSED_SELECT and cpu_select.fused_available(per_head, w):
        selected_idx = torch.empty(B, Lq, K, dtype=torch.long)
        valid = torch.empty(B, Lq, K, dtype=torch.bool)
        cpu_select.select_rows(per_head, w, L - Lq, selected_idx, valid, kept)
        return certify_selection(selected_idx, valid), valid
    if gemm != dtype:  # the bf16 GEMM's scores as chunked_select's torch passes make them
        scores = _causal_prefix_scores(per_head, w, L - Lq, [w.new_empty(0), w.new_empty(0), None])
    else:
        scores = index_scores(q, k.to(dtype), w)  # (B, Lq, L), -inf at future keys
    if kept != (0, 0):
        scores.masked_fill_(kept_keys(torch.arange(L - Lq, L, device=q.device), L, *kept), float("-inf"))
    return select_top_k(scores, top_k)


GEMV_ROWS = 16  # up to this many query-head rows a decode step's indexer GEMM runs key-major (_last_rows_gemm)


def _last_rows_gemm(q, k) -> torch.Tensor:
    """q (B, n, d_I) and k (B, L, d_I) -> q k^T (B, n, L), contiguous. A decode step's few rows (n <= GEMV_ROWS) run
    key-major, k q^T, then transposed: MKL's q k^T with n = 4 ran at half that speed over a key cache that is not in
    the CPU's caches (L 8192, one thread: fp32 400 vs 200 us per layer, bf16 580 vs 190)."""
    if q.shape[1] > GEMV_ROWS:
        return torch.bmm(q, k.transpose(1, 2))
    return torch.bmm(k, q.transpose(1, 2)).transpose(1, 2).contiguous()


def score_dtype(q, k, w) -> torch.dtype:
    """The dtype `index_scores` computes in: autocast's on q's device when it is on (under CUDA autocast the
    indexer's LayerNorm'd k is fp32 while q and w are bf16, and the matmuls run in bf16), else the promoted one."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), w.dtype)


def run_chunks(work, bounds: list, device) -> list:
    """Run `work(share)` over shares of the query-chunk `bounds` [(start, stop), ...]; return each share's result.

    GPU: one call with every chunk. CPU: the chunks are dealt round-robin (shares of similar cost) to
    min(torch.get_num_threads(), MAX_CPU_WORKERS) Python threads (from MIN_PARALLEL_CHUNKS chunks on; smaller
    calls stay on one) that run ONE intra-op thread each: torch ops release the GIL, so the workers use the
    cores without torch's per-op parallel-region barrier, which on the
    shared 2-core machine was measured 10-25x slower under a neighbour's load (selection at L=8192: 0.33 s
    idle, 5-9 s loaded; one thread 0.62 s either way). Shares must write disjoint outputs (or return their
    own accumulators for the caller to add). Grad mode is thread-local: the workers take the caller's.
    """
    if device.type != "cpu" or torch.compiler.is_compiling():  # compiled: one traced loop, no threads
        return [work(bounds)]
    workers = min(torch.get_num_threads(), MAX_CPU_WORKERS, len(bounds)) if len(bounds) >= MIN_PARALLEL_CHUNKS else 1
    grad = torch.is_grad_enabled()

    def in_caller_grad_mode(share):
        with torch.set_grad_enabled(grad):
            return work(share)

    with _one_thread():
        if workers <= 1:
            return [work(bounds)]
        with ThreadPoolExecutor(workers) as pool:
            return [f.result() for f in [pool.submit(in_caller_grad_mode, bounds[i::workers]) for i in range(workers)]]


def _select_chunks(q, k_t, k, w, K, score_fn, selected_idx, valid, bounds, low=None, kept=(0, 0)) -> None:
    keys = _KeyBuffer(q.shape[0], q.shape[1], q.device)
    work = [q.new_empty(0), q.new_empty(0), low[0].new_empty(0) if low else None]  # reused score buffers (fresh
    #                                                         ones cost ~7 % of the scoring on CPU, far more in bf16)
    for start, stop in bounds:
        if score_fn is None:
            gemm = (low[0][:, start:stop], low[1][:, :, :stop]) if low else (q[:, start:stop], k_t[:, :, :stop])
            per_head = _per_head_scores(*gemm, work)  # (B, c, H_I, stop)
            if FUSED_SELECT and cpu_select.fused_available(per_head, w):
                cpu_select.select_rows(per_head, w[:, start:stop], start, selected_idx[:, start:stop],
                                       valid[:, start:stop], kept)
                continue
            scores = _causal_prefix_scores(per_head, w[:, start:stop], start, work)
        else:
            scores = score_fn(q[:, start:stop], k[:, :stop], w[:, start:stop])  # (B, c, stop), -inf future
        if kept != (0, 0):
            scores.masked_fill_(kept_keys(torch.arange(start, stop, device=q.device), stop, *kept), float("-inf"))
        idx_c, valid_c = _chunk_top_k(scores, min(K, stop), keys)  # (B, c, min(K, stop))
        selected_idx[:, start:stop, :idx_c.shape[-1]] = idx_c.masked_fill_(~valid_c, -1)
        valid[:, start:stop, :idx_c.shape[-1]] = valid_c


def kept_keys(query_pos: torch.Tensor, L: int, sinks: int, window: int) -> torch.Tensor:
    """query_pos (R,) -> (R, L) bool, True at the keys a structured row always keeps: s < sinks or t - window < s <= t."""
    s = torch.arange(L, device=query_pos.device)[None, :]
    t = query_pos[:, None]
    return (s < sinks) | ((s > t - window) & (s <= t))


def _chunk_top_k(scores, K: int, keys: "_KeyBuffer"):
    """scores (B, c, S), -inf at forbidden keys -> the top-K (score, position) keys' positions (B, c, K), in the
    reference's order (`select_top_k`: descending, ties toward the most recent), and their validity (finite).

    Exact block-max prefilter: split each row into blocks of SELECT_BLOCK keys and keep the K blocks with the
    largest maximum (ties toward the later block); every top-K element lies in them (a block left out has K
    blocks above it, each holding an element above all of its own), so one top-K over their K * SELECT_BLOCK
    keys gives the row's top-K. Used where it shrinks the row at least twofold (measured at L=16384, k=256,
    one thread: 0.72 vs 1.12 s for keys + top-k over all chunks).
    """
    B, c, S = scores.shape
    b = SELECT_BLOCK
    nb = -(-S // b)  # blocks; the last one may be short
    if nb <= K or 2 * K * b > S:
        top = keys.of(scores).topk(K, dim=-1).indices
        return top, torch.isfinite(scores.gather(-1, top))
    maxima = F.max_pool1d(scores, b, ceil_mode=True)  # (B, c, nb) (3x faster than amax over (nb, b) on CPU)
    blocks = keys.of(maxima).topk(K, dim=-1, sorted=False).indices  # (B, c, K): (max, block index) keys
    positions = (blocks.unsqueeze(-1) * b + torch.arange(b, device=scores.device)).view(B, c, K * b)
    if S % b:  # slots past the end of the short last block: read a real key, then never selected as valid
        candidates = scores.gather(-1, positions.clamp(max=S - 1)).masked_fill_(positions >= S, float("-inf"))
    else:
        candidates = scores.gather(-1, positions)  # (B, c, K*b)
    slot = keys.of(candidates, positions).topk(K, dim=-1).indices  # (B, c, K) into the candidates
    return positions.gather(-1, slot), torch.isfinite(candidates.gather(-1, slot))


def _per_head_scores(q_c, k_t, work: list) -> torch.Tensor:
    """The chunk's per-head GEMM: q_c (B, c, H_I, d_I), k_t (B, d_I, stop) -> (B, c, H_I, stop) in a reused buffer:
    work[0] (the scores' dtype), or work[2] when q_c and k_t are bf16 (chunked_select's index_dtype) and the scores'
    dtype is not. `work`: flat buffers, grown as needed and written in place (work[1]: the summed scores)."""
    B, c, H_I, d_I = q_c.shape
    stop = k_t.shape[-1]
    low = work[2] is not None and q_c.dtype != work[0].dtype
    i = 2 if low else 0
    if work[i].numel() < B * c * H_I * stop:
        work[i] = work[i].new_empty(B * c * H_I * stop)
    per_head = work[i][:B * c * H_I * stop].view(B, c * H_I, stop)
    torch.bmm(q_c.reshape(B, c * H_I, d_I), k_t, out=per_head)  # one GEMM
    return per_head.view(B, c, H_I, stop)


def _causal_prefix_scores(per_head, w_c, start: int, work: list) -> torch.Tensor:
    """index_scores for queries [start, start + c) over keys [0, stop) from their per-head GEMM: per_head
    (B, c, H_I, stop) (`_per_head_scores`), w_c (B, c, H_I) -> (B, c, stop), -inf at future keys: ReLU, the head
    weights, and a mask on the diagonal (c, c) block only (only it can hold future keys: no (c, stop) mask tensor).
    The result is a view of work[1]; ReLU and the weights run in w_c's dtype (a bf16 GEMM's output is converted into
    work[0]). Otherwise per_head and w_c share one dtype (`score_dtype`): out= skips autocast, so a buffer in q's
    dtype next to an autocast-fp32 k would be refused."""
    B, c, H_I, stop = per_head.shape
    if per_head.dtype != w_c.dtype:  # bf16 GEMM (chunked_select's index_dtype)
        if work[0].numel() < per_head.numel():
            work[0] = work[0].new_empty(per_head.numel())
        per_head = work[0][:per_head.numel()].view_as(per_head).copy_(per_head)
    per_head.relu_()
    if work[1].numel() < B * c * stop:
        work[1] = work[1].new_empty(B * c * stop)
    scores = torch.bmm(w_c.reshape(B * c, 1, H_I), per_head.view(B * c, H_I, stop),
                       out=work[1][:B * c * stop].view(B * c, 1, stop)).view(B, c, stop)
    future = torch.ones(c, c, dtype=torch.bool, device=per_head.device).triu_(1)  # s > t inside the diagonal block
    scores[:, :, start:].masked_fill_(future, float("-inf"))
    return scores


class _KeyBuffer:
    """`sparse_attention.score_position_key` of a chunk's scores into one reused int64 buffer: the order-
    preserving score bits (high 32 bits) in 4 float/int32 passes and the positions (low 32 bits) in one,
    instead of ~7 passes, several of them over int64. Identical keys, so topk picks the identical set (ties -> most recent)."""

    def __init__(self, B: int, L: int, device):
        self.positions = torch.arange(L, dtype=torch.int32, device=device)
        self.buf = torch.empty(0, dtype=torch.int64, device=device)

    def of(self, scores: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """scores (B, c, S) -> int64 keys (B, c, S); `positions` (B, c, S) replaces 0..S-1 (a gathered subset)."""
        B, c, S = scores.shape
        if self.buf.numel() < scores.numel():
            self.buf = torch.empty(scores.numel(), dtype=torch.int64, device=scores.device)
        key = self.buf[:scores.numel()].view(B, c, S)
        words = key.view(torch.int32).view(B, c, S, 2)  # little-endian: [..., 0] low, [..., 1] high
        bits = (scores.float() + 0.0).view(torch.int32)  # float32 bits as the reference keys them (-0.0 -> +0.0)
        flip = (bits >> 31) & 0x7FFFFFFF  # negative floats: reverse their magnitude order
        if torch.compiler.is_compiling():  # out= into a strided view breaks a compiled graph
            words[..., 1] = torch.bitwise_xor(bits, flip)
        else:
            torch.bitwise_xor(bits, flip, out=words[..., 1])
        words[..., 0] = self.positions[:S] if positions is None else positions
        return key


def _selected_scores_chunk(q, k, w, idx):
    """q (B, c, H_I, d_I), k (B, L, d_I), w (B, c, H_I), idx (B, c, K) >= 0 -> (B, c, K) index scores."""
    B, c, K = idx.shape
    k_sel = k.gather(1, idx.reshape(B, c * K, 1).expand(-1, -1, k.shape[-1])).view(B, c, K, -1)  # (B, c, K, d_I)
    per_head = (q @ k_sel.transpose(-1, -2)).relu()  # (B, c, H_I, K)
    return (w.unsqueeze(-2) @ per_head).squeeze(-2)  # (B, c, K)


def selected_index_scores(q, k, w, selected_idx, valid):
    """Index scores I[t, S_t] at the selected slots, differentiable w.r.t. q, k, w, without an L x L tensor.

    q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I), selected_idx/valid (B, L, K) -> (B, L, K), -inf invalid.
    Chunks are recomputed in backward (activation checkpointing), so only (B, L, K) scores are kept.
    """
    B, L, K = selected_idx.shape
    safe = selected_idx.clamp(min=0)
    chunk = selected_scores_chunk(B, L, K, q.shape[2], k.shape[-1], q.device)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or w.requires_grad)
    parts = []
    for start in range(0, L, chunk):
        stop = min(L, start + chunk)
        args = (q[:, start:stop], k, w[:, start:stop], safe[:, start:stop])
        parts.append(checkpoint(_selected_scores_chunk, *args, use_reentrant=False) if grad
                     else _selected_scores_chunk(*args))
    return torch.cat(parts, dim=1).masked_fill(~valid, float("-inf"))


# ----------------------------------------------------------------------------- gather (token-level DSA)
class _one_thread:
    """Run the many small per-chunk ops on one thread: with 2 threads each op pays a parallel-region
    barrier, which on a shared 2-core machine was measured 3x slower (and far worse under load)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _mul_into(a, b, buf, shape):
    """a * b written into the flat buffer `buf` viewed as `shape` (no allocation per chunk in eager mode); a compiled
    graph gets a plain product instead (Inductor cannot lower out= into a view: seen on CUDA, torch 2.11)."""
    if torch.compiler.is_compiling():
        return a * b
    return torch.mul(a, b, out=buf[:math.prod(shape)].view(shape))


class _GatherAttention(torch.autograd.Function):
    """Sparse attention over the gathered selected keys. Per cache-sized query chunk the selected K and V rows are
    gathered straight into the (query, head)-major layout of batched per-head matmuls; dK/dV are one index_add of
    whole token rows (H*D) per selected slot, not one per head (2.4x faster measured). Chunks run on
    `run_chunks`' CPU worker threads, each with its own dK/dV accumulator. Forward saves the token-major q, the
    head-major k and v (the gather tables), out, the selection and the fp32 log-sum-exp; backward rebuilds the row numbers and recomputes the scores
    per chunk (nothing of size (B, H, L, K) is saved). Softmax statistics and probabilities are fp32 for half
    inputs; dK/dV accumulate in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, selected_idx, valid, return_probs):
        B, H, L, D = q.shape
        K = selected_idx.shape[-1]
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 statistics for half inputs
        qt = q.transpose(1, 2).contiguous()  # (B, L, H, D): token-major query rows (k, v stay head-major tables)
        out_t = torch.empty_like(qt)
        lse = torch.empty(B, L, H, dtype=acc, device=q.device)
        probs = torch.zeros(B, H, L, K, dtype=acc, device=q.device) if return_probs else None
        chunk = gather_chunk(B, H, L, K, D, q.device)

        def forward_chunks(share):  # writes the share's rows of out_t, lse, probs
            bufs = [q.new_empty(B * chunk * K * H * D) for _ in range(2)]  # flat: gathered K, V
            for start, stop in share:
                c = stop - start
                k_h, v_h, _ = _gather_rows(k, v, selected_idx, valid, start, stop, bufs)  # (B*c*H, K, D)
                q_c = qt[:, start:stop].reshape(B * c * H, 1, D)
                p, lse_c = _chunk_probs(q_c, k_h, valid[:, start:stop], None, acc)  # (B, c, H, K)
                out_t[:, start:stop] = (p.to(q.dtype).view(B * c * H, 1, K) @ v_h).view(B, c, H, D)
                lse[:, start:stop] = lse_c
                if return_probs:
                    probs[:, :, start:stop] = p.transpose(1, 2)

        run_chunks(forward_chunks, _chunk_bounds(L, chunk), q.device)
        ctx.save_for_backward(qt, k, v, selected_idx, valid, out_t, lse)
        if probs is not None:
            ctx.mark_non_differentiable(probs)
        return out_t.transpose(1, 2), probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        qt, k, v, selected_idx, valid, out_t, lse = ctx.saved_tensors
        B, L, H, D = qt.shape
        K = selected_idx.shape[-1]
        scale = D ** -0.5
        acc, dt = lse.dtype, qt.dtype
        go_t = grad_out.transpose(1, 2).contiguous()  # (B, L, H, D)
        delta = (go_t.to(acc) * out_t.to(acc)).sum(-1)  # (B, L, H)
        dq_t = torch.empty_like(qt)
        chunk = gather_chunk(B, H, L, K, D, qt.device)

        def backward_chunks(share):  # writes the share's rows of dq_t; returns its own dK, dV accumulators
            dk = torch.zeros(B * L, H * D, dtype=acc, device=qt.device)
            dv = torch.zeros(B * L, H * D, dtype=acc, device=qt.device)
            bufs = [qt.new_empty(B * chunk * K * H * D) for _ in range(3)]  # flat: gathered K, V; d(rows)
            for start, stop in share:
                c = stop - start
                q_c, do_c = qt[:, start:stop], go_t[:, start:stop]  # (B, c, H, D)
                k_h, v_h, rows = _gather_rows(k, v, selected_idx, valid, start, stop, bufs)
                p, _ = _chunk_probs(q_c.reshape(-1, 1, D), k_h, valid[:, start:stop], lse[:, start:stop], acc)
                dp = (do_c.reshape(-1, 1, D) @ v_h.transpose(1, 2)).view(B, c, H, K).to(acc)
                ds = (p * (dp - delta[:, start:stop, :, None]) * scale).to(dt)  # (B, c, H, K)
                dq_t[:, start:stop] = (ds.view(-1, 1, K) @ k_h).view(B, c, H, D)
                # d(selected token rows), token-major (B, c, K, H, D): one index_add row per selected slot, not one
                # per head (2.4x faster measured; dK and dV stacked into one index_add measured 5 % slower)
                n = rows.numel()
                d_rows = _mul_into(ds.transpose(2, 3).unsqueeze(-1), q_c.unsqueeze(2), bufs[2], (B, c, K, H, D))
                dk.index_add_(0, rows, d_rows.reshape(n, H * D).to(acc))
                d_rows = _mul_into(p.to(dt).transpose(2, 3).unsqueeze(-1), do_c.unsqueeze(2), bufs[2], (B, c, K, H, D))
                dv.index_add_(0, rows, d_rows.reshape(n, H * D).to(acc))
            return dk, dv

        parts = run_chunks(backward_chunks, _chunk_bounds(L, chunk), qt.device)
        dk, dv = (sum(x[1:], x[0]).view(B, L, H, D).transpose(1, 2).to(dt) for x in zip(*parts))
        return dq_t.transpose(1, 2), dk, dv, None, None, None


def _gather_rows(k, v, selected_idx, valid, start: int, stop: int, bufs):
    """Selected keys and values of queries [start, stop), gathered straight into the head-major layout of the
    per-head matmuls: k, v (B, H, L, D) contiguous -> k_h, v_h (B*c*H, K, D) in (b, t, h) order, one D-row read per
    (query, head, slot) (measured 1.5x faster than gathering whole token rows and transposing them), and the
    token rows (B*c*K,) into a (B*L, H*D) table for backward's dK/dV (invalid slots -> row 0 of their batch;
    their probability is forced to 0)."""
    B, H, L, D = k.shape
    K = selected_idx.shape[-1]
    c = stop - start
    token = torch.where(valid[:, start:stop], selected_idx[:, start:stop], 0)  # (B, c, K)
    rows = (token + (torch.arange(B, device=k.device) * L).view(B, 1, 1)).reshape(-1)
    head_rows = (token[:, :, None, :] + (torch.arange(B * H, device=k.device) * L).view(B, 1, H, 1)).reshape(-1)
    n = head_rows.numel()
    k_h, v_h = (torch.index_select(table.view(B * H * L, D), 0, head_rows, out=buf[:n * D].view(n, D)).view(B * c * H, K, D)
                for table, buf in ((k, bufs[0]), (v, bufs[1])))
    return k_h, v_h, rows


def _chunk_probs(q_c, k_h, valid_c, lse_c, acc):
    """q_c (B*c*H, 1, D), k_h (B*c*H, K, D), valid_c (B, c, K) -> softmax probabilities (B, c, H, K) in `acc`
    (0 at invalid slots) and the log-sum-exp (B, c, H); with a given lse_c (backward) P is recomputed from it."""
    B, c, K = valid_c.shape
    scores = (q_c @ k_h.transpose(1, 2)).view(B, c, -1, K).to(acc) * q_c.shape[-1] ** -0.5  # (B, c, H, K)
    if lse_c is None:
        scores.masked_fill_(~valid_c.unsqueeze(2), float("-inf"))
        lse_c = scores.logsumexp(-1)  # (B, c, H)
        return (scores - lse_c.unsqueeze(-1)).exp_(), lse_c
    p = (scores - lse_c.unsqueeze(-1)).exp_()
    return p.masked_fill_(~valid_c.unsqueeze(2), 0.0), lse_c


def _head_rows(selected_idx, valid, H: int, L: int) -> torch.Tensor:
    """(B, L, K) token indices -> (B, H, L, K) row numbers of a flattened (B*H*L, D) tensor (invalid -> own row 0)."""
    B = selected_idx.shape[0]
    base = (torch.arange(B * H, device=selected_idx.device) * L).view(B, H, 1, 1)
    return base + torch.where(valid, selected_idx, 0)[:, None]


def sparse_attention_gather(q, k, v, selected_idx, valid, return_probs: bool = False):
    """Token-level DSA touching only the selected keys. q, k, v (B, H, L, D); selected_idx, valid (B, L, K)
    -> out (B, H, L, D), probs at the selected slots (B, H, L, K) (detached; fp32 for half inputs) or None. The
    selection must keep `sparse_attention`'s contract (invalid = -1, valid positions in [0, L), distinct per row)."""
    check_selection(selected_idx, valid, q.shape[2])
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _GatherAttention.apply(q, k, v, selected_idx, valid, return_probs)


# ----------------------------------------------------------------------------- block-shared selection
def _pad_blocks(x: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    pad = -x.shape[dim] % block_size
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


@torch.no_grad()
def block_select(q, k, w, top_k: int, block_size: int = BLOCK_SIZE):
    """Query-block-shared selection: block b (queries [b*Bq, (b+1)*Bq)) gets the top-k past tokens s < b*Bq
    under a block-level indexer query: q and w mean-pooled over block b-1 (strictly earlier tokens, so causal).

    q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I) -> block_idx, block_valid (B, nb, Kb), Kb = min(k, (nb-1)*Bq).
    Cost: nb * L * H_I * d_I, i.e. Bq times cheaper than token-level scoring.
    """
    B, L, H_I, d_I = q.shape
    nb = -(-L // block_size)
    Kb = min(top_k, (nb - 1) * block_size)
    block_idx = torch.full((B, nb, Kb), -1, dtype=torch.long, device=q.device)
    block_valid = torch.zeros(B, nb, Kb, dtype=torch.bool, device=q.device)
    if Kb == 0:
        return block_idx, block_valid
    counts = torch.full((nb,), float(block_size), device=q.device)
    counts[-1] = L - (nb - 1) * block_size
    q_pool = _pad_blocks(q.float(), 1, block_size).view(B, nb, block_size, H_I, d_I).sum(2) / counts[:, None, None]
    w_pool = _pad_blocks(w.float(), 1, block_size).view(B, nb, block_size, H_I).sum(2) / counts[:, None]
    per_head = (q_pool[:, :-1].reshape(B, (nb - 1) * H_I, d_I) @ k.float().transpose(1, 2)).relu_()
    scores = (w_pool[:, :-1].reshape(B * (nb - 1), 1, H_I) @ per_head.view(B * (nb - 1), H_I, L)).view(B, nb - 1, L)
    starts = torch.arange(1, nb, device=q.device)[:, None] * block_size  # block b sees s < b*Bq
    scores.masked_fill_(torch.arange(L, device=q.device)[None, :] >= starts, float("-inf"))
    idx, ok = select_top_k(scores, Kb)  # (B, nb-1, Kb)
    block_idx[:, 1:], block_valid[:, 1:] = idx, ok
    return block_idx, block_valid


def expand_block_selection(block_idx, block_valid, block_size: int, L: int):
    """Block selection -> the equivalent token-level selection (B, L, Kb + Bq): the block's shared past
    tokens, then its own block's tokens s <= t. With `sparse_attention_masked` this is the block model's
    masked reference; its slot order matches `block_sparse_attention`'s probs."""
    B, nb, Kb = block_idx.shape
    t = torch.arange(L, device=block_idx.device)
    blk = t // block_size
    local = blk[:, None] * block_size + torch.arange(block_size, device=t.device)  # (L, Bq)
    local_valid = (local <= t[:, None]).expand(B, L, block_size)
    idx = torch.cat([block_idx[:, blk], local.expand(B, L, block_size)], dim=-1)
    valid = torch.cat([block_valid[:, blk], local_valid], dim=-1)
    return idx.masked_fill(~valid, -1), valid


def block_sparse_attention(q, k, v, block_idx, block_valid, block_size: int = BLOCK_SIZE,
                           return_probs: bool = False):
    """Block model attention with dense batched matmuls: each query block attends to its Kb shared past
    tokens plus its own block causally. q, k, v (B, H, L, D); block_idx/valid (B, nb, Kb)
    -> out (B, H, L, D), probs (B, H, L, Kb + Bq) in `expand_block_selection` slot order, or None."""
    B, H, L, D = q.shape
    nb, Kb, Bq = block_idx.shape[1], block_idx.shape[2], block_size
    qb, kb, vb = (_pad_blocks(x, 2, Bq).view(B, H, nb, Bq, D) for x in (q, k, v))  # (B, H, nb, Bq, D)
    local_ok = torch.ones(Bq, Bq, dtype=torch.bool, device=q.device).tril()  # (Bq, Bq) s <= t
    if Kb:
        rows = _head_rows(block_idx, block_valid, H, L).reshape(-1)  # (B*H*nb*Kb,) rows of (B*H*L, D)
        k_sel = k.reshape(B * H * L, D).index_select(0, rows).view(B, H, nb, Kb, D)
        v_sel = v.reshape(B * H * L, D).index_select(0, rows).view(B, H, nb, Kb, D)
        keys, vals = torch.cat([k_sel, kb], dim=3), torch.cat([v_sel, vb], dim=3)  # (B, H, nb, Kb+Bq, D)
        allowed = torch.cat([block_valid[:, :, None, :].expand(B, nb, Bq, Kb),
                             local_ok.expand(B, nb, Bq, Bq)], dim=-1)  # (B, nb, Bq, Kb+Bq)
    else:
        keys, vals, allowed = kb, vb, local_ok.expand(B, nb, Bq, Bq)
    if not return_probs:  # fused: SDPA per block with a boolean mask (measured ~10 % faster fwd+bwd on CPU)
        out = F.scaled_dot_product_attention(qb, keys, vals, attn_mask=allowed[:, None])
        return out.view(B, H, nb * Bq, D)[:, :, :L], None
    scores = (qb @ keys.transpose(-1, -2)) * D ** -0.5  # (B, H, nb, Bq, Kb+Bq)
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    out = (probs @ vals).view(B, H, nb * Bq, D)[:, :, :L]
    return out, probs.reshape(B, H, nb * Bq, Kb + Bq)[:, :, :L]


def block_index_scores(q, k, w, block_idx, block_size: int = BLOCK_SIZE):
    """I[t, s] at the block model's slots (its Kb shared past tokens, then its own block), differentiable:
    one batched matmul per block instead of a per-token gather (the block's keys are shared).

    q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I), block_idx (B, nb, Kb)
    -> (B, L, Kb + Bq) in `expand_block_selection` slot order (invalid slots hold finite garbage: mask them).
    """
    B, L, H_I, d_I = q.shape
    nb, Kb, Bq = block_idx.shape[1], block_idx.shape[2], block_size
    kb = _pad_blocks(k, 1, Bq).view(B, nb, Bq, d_I)  # own-block keys
    if Kb:
        k_sel = k.gather(1, block_idx.clamp(min=0).reshape(B, nb * Kb, 1).expand(-1, -1, d_I)).view(B, nb, Kb, d_I)
        kb = torch.cat([k_sel, kb], dim=2)  # (B, nb, Kb+Bq, d_I)
    qb = _pad_blocks(q, 1, Bq).view(B, nb, Bq * H_I, d_I)
    per_head = (qb @ kb.transpose(-1, -2)).relu().view(B, nb, Bq, H_I, Kb + Bq)
    wb = _pad_blocks(w, 1, Bq).view(B, nb, Bq, 1, H_I)
    return (wb @ per_head).view(B, nb * Bq, Kb + Bq)[:, :L]


@torch.no_grad()
def _selected_probs(q, k, selected_idx, valid):
    """(B, H, L, K) softmax probabilities of q over its selected keys, chunked (detached; fp32 for half inputs)."""
    B, H, L, D = q.shape
    K = selected_idx.shape[-1]
    rows = _head_rows(selected_idx, valid, H, L)
    kf = k.reshape(B * H * L, D)
    probs = torch.empty(B, H, L, K, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    chunk = gather_chunk(B, H, L, K, D, q.device)
    for start in range(0, L, chunk):
        stop = min(L, start + chunk)
        n = B * H * (stop - start)
        k_sel = kf.index_select(0, rows[:, :, start:stop].reshape(-1)).view(n, K, D)
        scores = (q[:, :, start:stop].reshape(n, 1, D) @ k_sel.transpose(1, 2)).view(B, H, stop - start, K)
        scores = scores.to(probs.dtype) * D ** -0.5  # fp32 statistics for half inputs
        probs[:, :, start:stop] = scores.masked_fill(~valid[:, None, start:stop], float("-inf")).softmax(-1)
    return probs


# ----------------------------------------------------------------------------- FlexAttention (block model)
def flex_block_attention(q, k, v, block_idx, block_valid, block_size: int = BLOCK_SIZE,
                         return_probs: bool = False):
    """The block model through FlexAttention: a BlockMask whose kv blocks are each query block's selected
    tokens and its own block. Same contract as `block_sparse_attention`."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not q.is_cuda and grad:
        raise ValueError("attention_backend='flex' has no backward on CPU (PyTorch flex_attention supports "
                         "CPU forward only); use 'block' on CPU, or run under torch.no_grad()")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if not q.is_cuda:  # CPU: forward only (checked above), flex refuses inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    B, H, L, D = q.shape
    nb = block_idx.shape[1]
    table = torch.zeros(B, nb, L + 1, dtype=torch.bool, device=q.device)  # (B, nb, L): selected past tokens
    table.scatter_(-1, torch.where(block_valid, block_idx, L), True)
    table = table[..., :L].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        qb = q_idx // block_size
        return table[b, qb, kv_idx] | ((kv_idx // block_size == qb) & (kv_idx <= q_idx))

    # GPU: the mask is built by a compiled mask_mod (no dense B x L x L evaluation in Python); CPU: eager. The
    # mask's tiles are flex_mask_block(block_size) wide; mask_mod stays exact inside every partial tile.
    mask = create_block_mask(mask_mod, B, None, L, L, device=q.device, BLOCK_SIZE=flex_mask_block(block_size),
                             _compile=q.is_cuda)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    pad = max(0, FLEX_MIN_HEAD_DIM - D)  # flex's kernels need D >= 16: zero columns change no score or output
    out = fn(*(F.pad(t, (0, pad)) for t in (q, k, v)), block_mask=mask, scale=D ** -0.5)[..., :D]
    if not return_probs:
        return out, None
    with torch.no_grad():
        idx, valid = expand_block_selection(block_idx, block_valid, block_size, L)
        return out, _selected_probs(q, k, idx, valid)


FLEX_MAX_TILE = 128  # the largest BLOCK_M / BLOCK_N / BLOCK_M1.. any torch (2.5-2.13) flex kernel tiles with


def flex_mask_block(block_size: int) -> int:
    """The BlockMask tile for a block model of `block_size`: the least multiple of block_size that
    FLEX_MAX_TILE divides. Torch's flex kernels need every mask tile divisible by their BLOCK_M/BLOCK_N (e.g.
    128 x 128 for bf16 d 64 on Hopper; "Q and KV block size must be divisible by BLOCK_M and BLOCK_N"
    otherwise); their tiles are powers of two <= 128. A 64-token block model then has 128-token mask tiles
    (each tile's kv list is the union of two query blocks' selections: correct, more tiles visited)."""
    return math.lcm(block_size, FLEX_MAX_TILE)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX
