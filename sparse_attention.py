"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp): lightning indexer, causal top-k selection,
sparse attention over the selected tokens, and the indexer's KL losses.

The masked path here is the *reference*: every faster path (dsa_lab/kernels/chunked.py) is tested against it.
Shapes: B batch, L sequence, H attention heads, D head dim, H_I / d_I indexer heads / dims, K top-k.
"""
from __future__ import annotations

import functools
import math
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsa_lab.common.rope import RotaryEmbedding
from dsa_lab.common.timing import cuda_mark, elapsed_s
from dsa_lab.common.work_sizes import prefix_bounds, work_budget


# ----------------------------------------------------------------------------- indexer
class LightningIndexer(nn.Module):
    """I[t,s] = sum_j w[t,j] * ReLU(q[t,j] . k[s]); one key head shared by all indexer heads.

    DeepSeek details: LayerNorm on k, RoPE on the first `rope_dim` dims of q and k (non-interleaved by
    default), w = weights_proj(x) * H_I^-1/2 * d_I^-1/2 (the d_I^-1/2 score scale folded into w).
    With `q_dim` (MLA, as DeepSeek-V3.2's Indexer) the queries read the attention's query latent: the input
    is then [x ; q_latent] (B, L, d_model + q_dim), keys and weights read x, queries read q_latent.
    """
    fast_selectable = True  # scores are exactly index_scores(*project(x)): chunked selection may skip forward()

    def __init__(self, d_model: int, n_heads: int, head_dim: int, rope_dim: int, max_seq_len: int,
                 rope_base: float = 10000.0, q_dim: int = 0, rope_interleaved: bool = False):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.d_model, self.q_dim = d_model, q_dim
        self.q_proj = nn.Linear(q_dim or d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)
        self.weights_proj = nn.Linear(d_model, n_heads, bias=False)
        self.rope = RotaryEmbedding(rope_dim, max_seq_len, rope_base, rope_interleaved) if rope_dim else None

    def _rope(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:  # (B, L, ..., d_I), RoPE on the leading rope_dim
        if self.rope is None:
            return x
        pe, nope = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([self.rope(pe, seq_dim=1, start=start), nope], dim=-1)

    def project(self, x: torch.Tensor, start: int = 0):
        """x (B, L, d_model) [or (B, L, d_model + q_dim)] -> q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I).
        `start`: position of the first token (> 0 when decoding after a cached prefix)."""
        B, L, _ = x.shape
        x, q_source = x.split([self.d_model, self.q_dim], dim=-1) if self.q_dim else (x, x)
        q = self._rope(self.q_proj(q_source).view(B, L, self.n_heads, self.head_dim), start)
        k = self._rope(self.k_norm(self.key_features(x, start)), start)
        w = self.weights_proj(x) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return q, k, w

    def row_rotation(self, start: int):
        """project_row's RoPE row at `start` (RotaryEmbedding.row), or None where project_row takes project(): q_dim,
        no or interleaved RoPE, a subclass's own project()."""
        if self.q_dim or self.rope is None or self.rope.interleaved or type(self).project is not LightningIndexer.project:
            return None
        return self.rope.row(start, self.head_dim)

    def project_row(self, x: torch.Tensor, start: int, rope_row=None):
        """project(x, start) for one position, x (B, 1, d_model), bit for bit, in ~12 torch ops instead of ~35 (a cached
        decode step runs it once per layer per token, where each op's dispatch costs more than its arithmetic): the
        queries and key rotated together. rope_row: row_rotation(start), which a caller may share across layers."""
        rope_row = rope_row if rope_row is not None else self.row_rotation(start)
        if rope_row is None:
            return self.project(x, start)
        B = x.shape[0]
        cos, sin, swap = rope_row
        qk = torch.cat([self.q_proj(x).view(B, self.n_heads, self.head_dim),
                        self.k_norm(self.key_features(x, start))], dim=1)  # (B, H_I + 1, d_I): the queries, the key
        qk = qk * cos + qk[..., swap] * sin
        w = self.weights_proj(x) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return qk[:, None, :-1], qk[:, -1:], w

    def key_features(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x (B, L, d_model) -> the keys before LayerNorm and RoPE (B, L, d_I); a subclass may read more."""
        return self.k_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) -> causal index scores (B, L, L), -inf where s > t."""
        return index_scores(*self.project(x))


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                 query_pos: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Lq, H_I, d_I), k (B, L, d_I), w (B, Lq, H_I) -> (B, Lq, L) with the causal -inf mask.

    Queries are the *last* Lq positions of the L keys (Lq == L for a full sequence), or at `query_pos` (Lq,).
    """
    B, Lq, H_I, d_I = q.shape
    L = k.shape[1]
    per_head = (q.reshape(B, Lq * H_I, d_I) @ k.transpose(1, 2)).relu_()  # (B, Lq*H_I, L): one GEMM
    scores = (w.reshape(B * Lq, 1, H_I) @ per_head.view(B * Lq, H_I, L)).view(B, Lq, L)  # head-weighted sum
    future = future_mask(Lq, L, q.device) if query_pos is None else rows_future_mask(query_pos, L)
    return scores.masked_fill_(future, float("-inf"))


def rows_future_mask(query_pos: torch.Tensor, L: int) -> torch.Tensor:
    """(Lq,) query positions -> (Lq, L) bool, True where key s lies after the query."""
    return torch.arange(L, device=query_pos.device)[None, :] > query_pos[:, None]


def future_mask(Lq: int, L: int, device) -> torch.Tensor:
    """(Lq, L) bool, True where key s lies after query t (queries are the last Lq of L positions)."""
    t = torch.arange(L - Lq, L, device=device)[:, None]
    return torch.arange(L, device=device)[None, :] > t


# ----------------------------------------------------------------------------- selection
class TopKTokenSelector(nn.Module):
    """S_t = top-k of I[t, :t+1]. Rows with t+1 <= k select every past token; the other slots are
    invalid (index -1, valid False) — never a future token."""

    def __init__(self, top_k: int):
        super().__init__()
        if top_k <= 0:
            raise ValueError(f"top_k={top_k} must be > 0")
        self.top_k = top_k

    def forward(self, scores: torch.Tensor):
        """scores (B, L, L) -> selected_idx (B, L, K) long (-1 = invalid), valid (B, L, K) bool, K = min(k, L)."""
        L = scores.shape[-1]
        scores = scores.masked_fill(future_mask(L, L, scores.device), float("-inf"))  # guard: never trust callers
        check_no_nan(scores)
        return select_top_k(scores, self.top_k)


def select_top_k(scores: torch.Tensor, top_k: int):
    """scores (..., Lq, S), -inf at forbidden keys -> selected_idx (..., Lq, K) (-1 = invalid), valid; K = min(k, S).

    Ties are broken toward the most recent tokens, so the reference and the chunked paths (dsa_lab/kernels/chunked.py), which
    see rows of different widths, pick the same set (ReLU scores tie at 0). One top-k over an exact int64 key
    (score bits, then position): no second pass and no host synchronisation.
    """
    K = min(top_k, scores.shape[-1])
    selected_idx = score_position_key(scores).topk(K, dim=-1).indices  # (..., Lq, K)
    valid = torch.isfinite(scores.gather(-1, selected_idx))
    selected_idx = selected_idx.masked_fill(~valid, -1)
    return certify_selection(selected_idx, valid), valid


# ----------------------------------------------------------------------------- the selection contract
# Every path (masked reference, gather, MQA, Triton) takes a selection as selected_idx (B, L, K) long and valid
# (B, L, K) bool with: a slot is invalid exactly when its index is -1 (no other marker, e.g. FlashMLA-style
# out-of-range positions); valid indices lie in [0, L); a row's valid indices are distinct (a repeated key would
# count once in the masked path and twice in the gathering ones). Anything else is refused by check_selection.
# A selection made by a top-k (select_top_k, kernels.chunked_select) satisfies it by construction and is
# certified, so the hot paths skip the check (a sort over K per row) while those tensors are unmodified.
_CERTIFIED: dict[int, tuple] = {}  # id(selected_idx) -> (ref to it, its _version, ref to valid, valid's _version)


def certify_selection(selected_idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Record that (selected_idx, valid), as they are now, satisfy the selection contract; returns selected_idx.
    Not under torch.compile (no bookkeeping in a graph; check_selection is skipped there too)."""
    if torch.compiler.is_compiling():
        return selected_idx
    key = id(selected_idx)
    _CERTIFIED[key] = (weakref.ref(selected_idx, lambda _, key=key: _CERTIFIED.pop(key, None)),
                       selected_idx._version, weakref.ref(valid), valid._version)
    return selected_idx


def _certified(selected_idx: torch.Tensor, valid: torch.Tensor) -> bool:
    entry = _CERTIFIED.get(id(selected_idx))
    return (entry is not None and entry[0]() is selected_idx and entry[1] == selected_idx._version
            and entry[2]() is valid and entry[3] == valid._version)


def check_selection(selected_idx: torch.Tensor, valid: torch.Tensor, L: int) -> None:
    """Refuse (ValueError, one line) a selection that breaks the contract above; certify one that keeps it.
    Skipped under torch.compile: a host-synchronising check would break the graph (a compiled training step
    attends over the top-k selections it made itself)."""
    if torch.compiler.is_compiling() or _certified(selected_idx, valid):
        return
    if valid.dtype != torch.bool or selected_idx.dtype not in (torch.long, torch.int32) or valid.shape != selected_idx.shape:
        raise ValueError(f"selection: selected_idx must be long and valid bool of one shape (B, L, K); got "
                         f"{selected_idx.dtype} {tuple(selected_idx.shape)} and {valid.dtype} {tuple(valid.shape)}")
    if bool(((selected_idx == -1) == valid).any()):
        raise ValueError("selection: invalid slots must hold index -1 and valid ones a position >= 0 (no other "
                         "marker, e.g. an out-of-range position); set selected_idx = selected_idx.masked_fill(~valid, -1)")
    if bool((selected_idx >= L).any() | (selected_idx < -1).any()):
        raise ValueError(f"selection: a valid index lies outside [0, L={L}); select positions of this sequence only")
    ordered = selected_idx.sort(-1).values
    if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
        raise ValueError("selection: a row selects the same position twice; give each row distinct positions "
                         "(a repeated key would be counted twice by the gathering paths and once by the masked one)")
    certify_selection(selected_idx, valid)


NAN_SCORES = ("index scores contain NaN: the indexer diverged or its input holds NaN/inf; lower the indexer learning "
              "rate or check the model's activations")


def check_no_nan(*tensors: torch.Tensor) -> None:
    """NaN index scores (or indexer inputs) would sort above +inf: refuse them with one clear error. Skipped under
    torch.compile (a host-synchronising branch breaks the graph; a diverged indexer still ends the run through the
    non-finite loss check of train._update)."""
    if torch.compiler.is_compiling():
        return
    if any(torch.isnan(t).any() for t in tensors):
        raise ValueError(NAN_SCORES)


def score_position_key(scores: torch.Tensor) -> torch.Tensor:
    """(..., S) float -> int64 keys ordered as (score, position): the float's bits mapped to an order-preserving
    integer in the high 32 bits, the key's position in the low ones (-0.0 counts as +0.0)."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # negative floats: reverse magnitude
    position = torch.arange(scores.shape[-1], device=scores.device)
    return (ordered << 32) | position


def kept_pair_fraction(L: int, k: int) -> float:
    """Selected causal (query, key) pairs / all causal pairs for top-k at length L: sum_t min(k, t+1) / (L(L+1)/2)."""
    full = min(k, L)
    kept = full * (full + 1) // 2 + (L - full) * full
    return kept / (L * (L + 1) / 2)


# ----------------------------------------------------------------------------- attention maths
def causal_attention_probs(q: torch.Tensor, k: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, Lq, D), k (B, H, L, D) -> causal softmax probabilities (B, H, Lq, L); the queries are the last Lq
    of the L positions (Lq == L for a full sequence), or at `query_pos` (Lq,)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    L = k.shape[2]
    future = future_mask(q.shape[2], L, q.device) if query_pos is None else rows_future_mask(query_pos, L)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def selection_mask(selected_idx: torch.Tensor, valid: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L, K) indices + validity -> (B, L, L) bool, True at selected (t, s)."""
    mask = torch.zeros(*selected_idx.shape[:2], L + 1, dtype=torch.bool, device=selected_idx.device)
    slot = torch.where(valid, selected_idx, L)  # invalid slots write into a spare column
    return mask.scatter_(-1, slot, True)[..., :L]


def sparse_attention_masked(q, k, v, selected_idx, valid, return_probs: bool = False):
    """Reference sparse attention: dense scores with everything outside S_t set to -inf.

    q (B, H, L, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv) (Hkv = H, or GQA: Hkv divides H and query head h uses
    KV head h // (H / Hkv)); selected_idx, valid (B, L, K) -> out (B, H, L, Dv) and, if asked,
    the probabilities at the selected slots (B, H, L, K) (0 at invalid slots).
    """
    L = q.shape[2]
    check_selection(selected_idx, valid, L)
    if k.shape[1] != q.shape[1]:  # GQA: each KV head serves H / Hkv query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    allowed = selection_mask(selected_idx, valid, L)[:, None]  # (B, 1, L, L)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, H, L, L)
    out = probs @ v
    if not return_probs:
        return out, None
    idx = selected_idx.clamp(min=0)[:, None].expand(-1, q.shape[1], -1, -1)
    return out, probs.gather(-1, idx) * valid[:, None]


def sparse_mqa_attention_masked(q, kv, selected_idx, valid, *, v_dim: int, scale=None, return_probs: bool = False):
    """Reference for the MQA layout (MLA's absorbed mode): every head attends over one shared row per token,
    keys kv, values kv[..., :v_dim]; kv expanded to every head, then `sparse_attention_masked`.

    q (B, L, H, D), kv (B, L, D), selected_idx/valid (B, L, K) -> out (B, L, H, v_dim), probs (B, H, L, K) or None.
    Rows with no valid slot give output 0 (and probs 0) without NaN in values or gradients.
    """
    B, L, H, D = q.shape
    check_selection(selected_idx, valid, L)
    empty = ~valid.any(-1)  # (B, L) rows with nothing to attend to
    if empty.any():  # attend to slot 0 = token 0 there (finite), then zero the row
        valid = valid.clone()
        selected_idx = selected_idx.clone()
        valid[..., 0] |= empty
        selected_idx[..., 0] = torch.where(empty, 0, selected_idx[..., 0])
    q_heads = q.transpose(1, 2) * ((D ** -0.5 if scale is None else scale) * D ** 0.5)  # (B, H, L, D); the reference scales by D^-1/2
    keys = kv[:, None].expand(B, H, L, D)
    values = kv[:, None, :, :v_dim].expand(B, H, L, v_dim)
    out, probs = sparse_attention_masked(q_heads, keys, values, selected_idx, valid, return_probs)
    out = out.transpose(1, 2).masked_fill(empty[:, :, None, None], 0.0)  # (B, L, H, v_dim)
    if probs is not None:
        probs = probs.masked_fill(empty[:, None, :, None], 0.0).detach()
    return out, probs


# ----------------------------------------------------------------------------- indexer losses
def indexer_kl_dense(attn_probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Warm-up loss: mean over (b, t) of KL(p[t,:] || softmax(I[t,:])) over the causal prefix.

    attn_probs (B, H, L, L) main attention (detached), scores (B, L, L) with -inf future.
    p = head-summed probabilities, L1-normalised along s. (The paper sums over t; we average so the
    loss scale does not grow with L — a constant factor.)
    """
    p = attn_probs.sum(1)
    p = p / p.sum(-1, keepdim=True)
    return _kl(p, scores, torch.isfinite(scores))


def indexer_kl_sparse(selected_probs: torch.Tensor, selected_scores: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
    """Sparse-stage loss: mean over (b, t) of KL(p[t,S_t] || softmax(I[t,S_t])).

    selected_probs (B, H, L, K) main attention at the selected slots (detached);
    selected_scores (B, L, K) index scores at the same slots; valid (B, L, K).
    """
    p = selected_probs.sum(1) * valid
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return _kl(p, selected_scores, valid)


def _kl(p: torch.Tensor, scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """mean over rows of sum_s p log(p / softmax(scores)) over `support` (0 log 0 = 0)."""
    log_q = scores.masked_fill(~support, float("-inf")).log_softmax(-1)
    terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p))
    return terms.sum(-1).mean()


# ----------------------------------------------------------------------------- forward options and results
class SectionTimer:
    """Accumulates the time of named sections. CPU: wall time. CUDA: an event recorded before and after each section
    (no host sync, so the sections run as they would untimed) and resolved in one sync when `totals` is read."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self._totals: dict[str, float] = {}
        self._pending: list[tuple] = []  # CUDA: (name, start event, end event) not yet in the totals

    @property
    def totals(self) -> dict[str, float]:
        """{section: seconds}, every section timed so far included."""
        self.resolve()
        return self._totals

    @totals.setter
    def totals(self, totals: dict[str, float]) -> None:
        self.resolve()
        self._totals = totals

    def time(self, name: str, fn, *args):
        if self.cuda:
            start = cuda_mark()
            result = fn(*args)
            self._pending.append((name, start, cuda_mark()))
            return result
        start = time.perf_counter()
        result = fn(*args)
        self._totals[name] = self._totals.get(name, 0.0) + time.perf_counter() - start
        return result

    def resolve(self) -> None:
        """Add the recorded CUDA sections to the totals: one sync (on the last event), however many sections."""
        if not self._pending:
            return
        self._pending[-1][2].synchronize()
        for name, start, end in self._pending:
            self._totals[name] = self._totals.get(name, 0.0) + elapsed_s(start, end)
        self._pending.clear()


def timed(timer: SectionTimer | None, name: str, fn, *args):
    return timer.time(name, fn, *args) if timer is not None else fn(*args)


INDEXER_LOSS_MODES = (None, "dense", "sparse")


@dataclass(frozen=True)
class AttentionMode:
    """What one forward computes (passed down, never left in module state).

    sparse        False = dense attention (warm-up, or the classic model)
    indexer_loss  None | 'dense' (warm-up KL over all s <= t; needs sparse=False) | 'sparse' (KL over S_t;
                  needs sparse=True)
    stats         return indexer recall vs dense attention (evaluation) and the selected indices
    timer         accumulate 'indexer' / 'attention' time (CPU: wall; CUDA: events, no sync; profiled steps only)
    """
    sparse: bool = True
    indexer_loss: str | None = None
    stats: bool = False
    timer: SectionTimer | None = None

    def __post_init__(self):
        if self.indexer_loss not in INDEXER_LOSS_MODES:
            raise ValueError(f"indexer_loss={self.indexer_loss!r} is unknown; use None, 'dense' or 'sparse'")
        if self.indexer_loss == "sparse" and not self.sparse:
            raise ValueError("indexer_loss='sparse' needs sparse=True (the KL over the selected set)")
        if self.indexer_loss == "dense" and self.sparse:
            raise ValueError("indexer_loss='dense' needs sparse=False (the warm-up KL uses dense attention)")

    @property
    def needs_indexer(self) -> bool:
        return self.sparse or self.indexer_loss is not None or self.stats


DENSE = AttentionMode(sparse=False)


@dataclass
class AttentionAux:
    """What one attention layer computed beside its output."""
    indexer_loss: torch.Tensor | None = None  # scalar KL (when the mode asked for one)
    stats: dict | None = None  # selection_recall(...) (when mode.stats)
    selected_idx: torch.Tensor | None = None  # (B, L, K), -1 = invalid (when the layer selected)
    index_scores: torch.Tensor | None = None  # (B, L, L) full scores (reference selection only), for sharing
    coarse_scores: torch.Tensor | None = None  # (B, L, nb) a multi-scale indexer's block scores, for sharing


# ----------------------------------------------------------------------------- backends
@dataclass
class Selection:
    """A layer's choice of keys. Token level: selected_idx/valid (B, L, K). Block backends also keep the
    block-level choice (B, nb, Kb) they expand from. `scores` (B, L, L) when the full index scores were
    built (reference selection); `index_inputs` (q, k, w) when they were not (chunked selection);
    `coarse_scores` (B, L, nb) when a multi-scale selector read a MultiScaleIndexer's block scores."""
    selected_idx: torch.Tensor
    valid: torch.Tensor
    scores: torch.Tensor | None = None
    index_inputs: tuple | None = None
    block_idx: torch.Tensor | None = None
    block_valid: torch.Tensor | None = None
    block_size: int = 0
    coarse_scores: torch.Tensor | None = None


def reference_select(indexer, selector, x: torch.Tensor, *, shared_scores: torch.Tensor | None = None,
                     shared_coarse: torch.Tensor | None = None) -> Selection:
    """Full (B, L, L) index scores, then the selector. x (B, L, d_model), already detached from the main
    model. A layer sharing its group leader's indexer passes the leader's scores instead of an indexer.

    A selector with `reads_coarse` (optimized_indexers.RegionRestrictedSelector) also gets the multi-scale
    indexer's coarse block scores (B, L, nb), computed in the same call (`scores_and_coarse`), or the leader's."""
    if not getattr(selector, "reads_coarse", False):
        scores = shared_scores if indexer is None else indexer(x)  # (B, L, L), -inf future
        return Selection(*selector(scores.detach()), scores=scores)
    scores, coarse = (shared_scores, shared_coarse) if indexer is None else indexer.scores_and_coarse(x)
    return Selection(*selector(scores.detach(), coarse), scores=scores, coarse_scores=coarse)


class MaskedBackend:
    """The reference backend: full index scores, the selector's top-k, dense scores masked to S_t.

    Every backend has the same three methods with the same signatures (tests/test_kernels.py checks it):
      select(indexer, selector, x, *, shared_scores, shared_coarse)  -> Selection
      attend(q, k, v, *, selection, return_probs)          -> out (B, H, L, D), probs at slots (B, H, L, K) | None
      attend_latent(q, kv, *, selection, v_dim, scale, return_probs)  the same over one KV row shared by heads
      selected_scores(selection)                           -> index scores at the slots (B, L, K), -inf invalid
    """
    name = "masked"
    block_size = 0

    def select(self, indexer, selector, x: torch.Tensor, *, shared_scores: torch.Tensor | None = None,
               shared_coarse: torch.Tensor | None = None) -> Selection:
        return reference_select(indexer, selector, x, shared_scores=shared_scores, shared_coarse=shared_coarse)

    def attend(self, q, k, v, *, selection: Selection, return_probs: bool = False):
        return sparse_attention_masked(q, k, v, selection.selected_idx, selection.valid, return_probs)

    def attend_latent(self, q, kv, *, selection: Selection, v_dim: int, scale: float, return_probs: bool = False):
        """MQA layout: q (B, L, H, D), one shared row per token kv (B, L, D) -> out (B, L, H, v_dim), probs."""
        return sparse_mqa_attention_masked(q, kv, selection.selected_idx, selection.valid, v_dim=v_dim, scale=scale,
                                           return_probs=return_probs)

    def selected_scores(self, selection: Selection) -> torch.Tensor:
        scores = selection.scores.gather(-1, selection.selected_idx.clamp(min=0))
        return scores.masked_fill(~selection.valid, float("-inf"))


# ----------------------------------------------------------------------------- attention modules
class CausalSelfAttention(nn.Module):
    """Dense causal multi-head attention with RoPE (the classic model's attention).

    The attention maths is split into hooks that DeepSeekSparseAttention's forward calls, so another
    layout (models.MultiHeadLatentAttention) can reuse that forward:
      project(x) -> heads; attend_dense(heads) -> out; attend_dense_probs(heads) -> out, probs (B, H, L, L);
      attend_selected(heads, backend, selection, return_probs) -> out, probs at slots (B, H, L, K) | None;
      recall_inputs(heads) -> q, k (B, H, L, D); indexer_input(x, heads) -> what the indexer reads (detached).
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, cfg.max_seq_len, cfg.rope_base)

    def project(self, x: torch.Tensor, start: int = 0):
        """x (B, L, d_model) -> q, k, v (B, H, L, D), RoPE applied to q and k at positions start..start+L-1."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).unbind(2)  # (B, L, H, D)
        q, k = self.rope(q, seq_dim=1, start=start), self.rope(k, seq_dim=1, start=start)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def merge(self, out: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> (B, L, d_model)
        B, H, L, D = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H * D))

    def attend_dense(self, heads) -> torch.Tensor:
        return self.merge(F.scaled_dot_product_attention(*heads, None, 0.0, True))

    def attend_dense_probs(self, heads):
        q, k, v = heads
        probs = causal_attention_probs(q, k)  # (B, H, L, L)
        return self.merge(probs @ v), probs

    def attend_selected(self, heads, backend, selection, return_probs: bool):
        out, probs = backend.attend(*heads, selection=selection, return_probs=return_probs)
        return self.merge(out), probs

    def recall_inputs(self, heads):
        return heads[0], heads[1]

    def indexer_input(self, x: torch.Tensor, heads) -> torch.Tensor:
        return x.detach()

    def forward(self, x: torch.Tensor, mode: AttentionMode = DENSE, shared_scores=None, shared_coarse=None):
        """x (B, L, d_model) -> out (B, L, d_model), AttentionAux (empty: no indexer)."""
        if mode.needs_indexer:
            raise ValueError(f"{mode} asks for an indexer, but dense attention has none; use AttentionMode(sparse=False)")
        return timed(mode.timer, "attention", self.attend_dense, self.project(x)), AttentionAux()


class SparseAttentionLayer:
    """DSA on top of an attention layout's hooks (see CausalSelfAttention): indexer, selector, backend.

    The indexer always reads a detached input: no gradient flows from the indexer into the main model,
    and top-k is not differentiable, so the LM loss never reaches the indexer.
    """

    def init_sparse(self, cfg, indexer, selector, backend, shares_indexer: bool, indexer_q_dim: int = 0) -> None:
        self.indexer = None if shares_indexer else indexer or LightningIndexer(
            cfg.d_model, cfg.indexer_heads, cfg.indexer_dim, cfg.indexer_rope_dim, cfg.max_seq_len, cfg.rope_base,
            q_dim=indexer_q_dim, rope_interleaved=cfg.indexer_rope_interleaved)
        self.selector = selector or TopKTokenSelector(cfg.sparse_top_k)
        self.backend = backend or MaskedBackend()
        self.objective = None  # the levers' indexer losses (levers.IndexerObjective: .dense, .sparse) or the paper's KLs

    def forward(self, x: torch.Tensor, mode: AttentionMode = AttentionMode(), shared_scores=None, shared_coarse=None,
                **selector_inputs):
        """x (B, L, d_model) -> out (B, L, d_model), AttentionAux. A layer sharing its group leader's indexer gets
        the leader's index scores (and, multi-scale, its coarse block scores). `selector_inputs`: what the selector
        reads beside the scores (models.AdaptiveMoELLM's controller: tokens, hidden), passed to it on every call."""
        positional = getattr(self.selector, "positional", False)  # indexer-free controls (local, random)
        if positional and mode.indexer_loss:
            raise ValueError(f"an indexer-free selector ({type(self.selector).__name__}) has no indexer loss; "
                             f"use AttentionMode(indexer_loss=None)")
        if self.indexer is None and shared_scores is None and mode.needs_indexer and not positional:
            raise ValueError("this layer shares its group leader's indexer: pass the leader's index scores "
                             "as shared_scores (the model does)")
        heads = self.project(x)
        if not mode.needs_indexer:
            return timed(mode.timer, "attention", self.attend_dense, heads), AttentionAux()
        aux = AttentionAux()
        index_input = self.indexer_input(x, heads)
        selector = functools.partial(self.selector, **selector_inputs) if selector_inputs else self.selector
        if positional:  # the oracle control also reads the layer's own (q, k)
            extra = {"attention": self.recall_inputs(heads)} if getattr(self.selector, "reads_attention", False) else {}
            selection = timed(mode.timer, "indexer", lambda: Selection(*self.selector.select(
                x.shape[0], x.shape[1], x.device, **extra)))
        elif mode.sparse:
            with torch.set_grad_enabled(torch.is_grad_enabled() and mode.indexer_loss == "sparse"):
                selection = timed(mode.timer, "indexer", lambda: self.backend.select(
                    self.indexer, selector, index_input, shared_scores=shared_scores, shared_coarse=shared_coarse))
        else:  # dense attention: the indexer runs for the warm-up KL and/or recall statistics
            with torch.set_grad_enabled(torch.is_grad_enabled() and mode.indexer_loss == "dense"):
                selection = timed(mode.timer, "indexer", lambda: reference_select(
                    self.indexer, selector, index_input, shared_scores=shared_scores, shared_coarse=shared_coarse))
        if mode.sparse:
            out, selected_probs = timed(mode.timer, "attention", self.attend_selected, heads, self.backend,
                                        selection, mode.indexer_loss == "sparse")
            if mode.indexer_loss == "sparse":
                selected_scores = self.backend.selected_scores(selection)
                aux.indexer_loss = (self.objective.sparse(selected_probs.detach(), selected_scores, selection)
                                    if self.objective else
                                    indexer_kl_sparse(selected_probs.detach(), selected_scores, selection.valid))
        else:
            out, probs = timed(mode.timer, "attention", self.attend_dense_probs, heads)
            if mode.indexer_loss == "dense":
                kl = self.objective.dense if self.objective else indexer_kl_dense
                aux.indexer_loss = kl(probs.detach(), selection.scores)
        aux.index_scores, aux.selected_idx = selection.scores, selection.selected_idx
        aux.coarse_scores = selection.coarse_scores
        if mode.stats:
            q, k = self.recall_inputs(heads)
            aux.stats = selection_recall(q.detach(), k.detach(), selection.selected_idx, selection.valid)
        return out, aux


class DeepSeekSparseAttention(SparseAttentionLayer, CausalSelfAttention):
    """Causal multi-head attention where query t attends only to S_t, chosen by the lightning indexer.

    One index set per (batch, query) shared by all heads. The indexer, selector and backend are given
    (models.py builds them from the config); the defaults are the reference pieces. `shares_indexer=True`
    makes a layer that reuses its group leader's index scores (passed to forward as `shared_scores`).
    """

    def __init__(self, cfg, indexer: nn.Module | None = None, selector: nn.Module | None = None,
                 backend: MaskedBackend | None = None, shares_indexer: bool = False):
        super().__init__(cfg)
        self.init_sparse(cfg, indexer, selector, backend, shares_indexer)


def recall_bounds(B: int, H: int, L: int, device) -> list:
    """Query chunks of `selection_recall`: each chunk's dense probabilities (B, H, c, stop) within the 'recall'
    work budget (dsa_lab/common/work_sizes.py)."""
    return prefix_bounds(L, B * H, work_budget(device, "recall"))


@torch.no_grad()
def selection_recall(q, k, selected_idx, valid) -> dict:
    """Share of dense attention mass inside S_t, vs a random and a local (last-k_t) selection of equal size.

    k_t = the row's valid slots (K = min(k, t+1) for plain top-k; per row for adaptive k and patterns).
    Counted only over query rows with k_t < t+1, where selection actually drops tokens.
    Random recall is its exact expectation k_t/(t+1); oracle recall, the ceiling, is the mass of the row's own top-k_t
    keys of the dense attention. Returns sums and the row count (so batches add up).
    q, k (B, H, L, D). Chunked over queries (`recall_bounds`): the fp32 probabilities exist one (B, H, c, stop)
    block at a time, never (B, H, L, L); `selection_recall_dense` is the unchunked reference. Always fp32, also
    under autocast (a statistic, not part of the model).
    """
    with torch.autocast(q.device.type, enabled=False):
        return _selection_recall_chunked(q, k, selected_idx, valid)


def _selection_recall_chunked(q, k, selected_idx, valid) -> dict:
    B, H, L, _ = q.shape
    t = torch.arange(L, device=q.device)
    row_k = valid.sum(-1)  # (B, L)
    rows = row_k < t + 1  # (B, L)
    recall = torch.empty(B, L, device=q.device)
    local = torch.empty(B, L, device=q.device)
    oracle = torch.empty(B, L, device=q.device)
    by_bucket = torch.zeros(3, L.bit_length(), device=q.device)  # distance buckets [0], [1], [2, 3], ... < L
    qf, kf = q.float(), k.float()
    for start, stop in recall_bounds(B, H, L, q.device):
        p = causal_attention_probs(qf[:, :, start:stop], kf[:, :, :stop]).sum(1)
        p = p / p.sum(-1, keepdim=True)  # (B, c, stop)
        idx_c, valid_c, t_c = selected_idx[:, start:stop], valid[:, start:stop], t[start:stop]
        recall[:, start:stop] = (p.gather(-1, idx_c.clamp(min=0)) * valid_c).sum(-1)
        local[:, start:stop] = p.masked_fill(t[None, None, :stop] <= (t_c[None, :, None] - row_k[:, start:stop, None]),
                                             0.0).sum(-1)  # last k_t
        bucket = (t_c[:, None] - t[None, :stop]).clamp(min=0).add(1).float().log2().floor().long()  # (c, stop)
        in_rows = p * rows[:, start:stop, None]  # (B, c, stop)
        chosen = in_rows * selection_mask(idx_c, valid_c, stop)
        by_bucket[0].index_add_(0, bucket.flatten(), in_rows.sum(0).flatten())
        by_bucket[1].index_add_(0, bucket.flatten(), chosen.sum(0).flatten())
        in_top = _oracle_top(p, t_c, row_k[:, start:stop])  # (B, c, stop)
        oracle[:, start:stop] = (p * in_top).sum(-1)
        by_bucket[2].index_add_(0, bucket.flatten(), (in_rows * in_top).sum(0).flatten())
    return _recall_sums(by_bucket, rows, recall, local, oracle, row_k, t)


def _recall_sums(by_bucket, rows, recall, local, oracle, row_k, t) -> dict:
    """The sums both recall paths return: by_bucket (3, n_buckets) dense / selected / oracle mass per distance
    bucket; rows, row_k (B, L); recall, local, oracle (B, L) per row; t (L,) positions."""
    return {
        "mass_by_distance": by_bucket[0].tolist(),  # dense attention mass per distance bucket
        "selected_mass_by_distance": by_bucket[1].tolist(),  # ... of which inside S_t
        "oracle_mass_by_distance": by_bucket[2].tolist(),  # ... of which inside the oracle's top-k_t
        "oracle_recall_sum": float(oracle[rows].sum()),
        "rows": int(rows.sum()),
        "recall_sum": float(recall[rows].sum()),
        "local_recall_sum": float(local[rows].sum()),
        "random_recall_sum": float((row_k / (t + 1.0))[rows].sum()),
        "queries": row_k.numel(),
        "selected_sum": int(row_k.sum()),
    }


def _oracle_top(p, t_c, row_k_c):
    """The ceiling's set at each row's budget k_t: its own top-k_t keys of p (B, c, stop) -> bool (B, c, stop)."""
    stop = p.shape[-1]
    keys = torch.arange(stop, device=p.device)
    order = p.masked_fill(keys[None, None, :] > t_c[None, :, None], -1.0).argsort(-1, descending=True)
    return torch.zeros_like(p, dtype=torch.bool).scatter_(-1, order, keys[None, None, :] < row_k_c[..., None])


@torch.no_grad()
def selection_recall_dense(q, k, selected_idx, valid) -> dict:
    """The reference twin of `selection_recall`, building (B, H, L, L) fp32 at once: share of dense attention
    mass inside S_t, vs a random and a local (last-k_t) selection of equal size.

    k_t = the row's valid slots (K = min(k, t+1) for plain top-k; per row for adaptive k and patterns).
    Counted only over query rows with k_t < t+1, where selection actually drops tokens.
    Random recall is its exact expectation k_t/(t+1). Returns sums and the row count (so batches add up).
    """
    L = q.shape[2]
    with torch.autocast(q.device.type, enabled=False):
        p = causal_attention_probs(q.float(), k.float()).sum(1)
    p = p / p.sum(-1, keepdim=True)  # (B, L, L)
    recall = (p.gather(-1, selected_idx.clamp(min=0)) * valid).sum(-1)  # (B, L)
    t = torch.arange(L, device=q.device)
    row_k = valid.sum(-1)  # (B, L)
    local = p.masked_fill(t[None, None, :] <= t[None, :, None] - row_k[..., None], 0.0).sum(-1)  # last k_t
    rows = row_k < t + 1  # (B, L)
    # the ceiling at each row's budget k_t: its top-k_t keys of p itself (what OracleSelector keeps)
    order = p.masked_fill(future_mask(L, L, q.device), -1.0).argsort(-1, descending=True)  # (B, L, L)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, order, t[None, None, :] < row_k[..., None])
    oracle = (p * in_top).sum(-1)  # (B, L)
    # dense mass by query-key distance bucket (powers of two: [0], [1], [2, 3], [4, 7], ...), over the same rows
    bucket = (t[:, None] - t[None, :]).clamp(min=0).add(1).float().log2().floor().long()  # (L, L)
    n_buckets = int(bucket.max()) + 1
    in_rows = p * rows[..., None]  # (B, L, L)
    chosen = in_rows * selection_mask(selected_idx, valid, L)
    by_bucket = torch.zeros(3, n_buckets, dtype=p.dtype, device=p.device)
    by_bucket[0].index_add_(0, bucket.flatten(), in_rows.sum(0).flatten())
    by_bucket[1].index_add_(0, bucket.flatten(), chosen.sum(0).flatten())
    by_bucket[2].index_add_(0, bucket.flatten(), (in_rows * in_top).sum(0).flatten())
    return _recall_sums(by_bucket, rows, recall, local, oracle, row_k, t)


def merge_recall_stats(stats: list[dict]) -> dict:
    """Add per-layer/per-batch recall sums -> {'indexer_recall', 'random_recall', 'local_recall', 'oracle_recall'},
    mean_selected_keys, and recall_by_distance / oracle_recall_by_distance."""
    rows = sum(s["rows"] for s in stats)
    merged = {name: sum(s[key] for s in stats) / rows if rows else math.nan
              for name, key in (("indexer_recall", "recall_sum"), ("random_recall", "random_recall_sum"),
                                ("local_recall", "local_recall_sum"), ("oracle_recall", "oracle_recall_sum"))}
    merged["mean_selected_keys"] = sum(s["selected_sum"] for s in stats) / sum(s["queries"] for s in stats)
    n = max(len(s["mass_by_distance"]) for s in stats)
    mass, chosen, best = [0.0] * n, [0.0] * n, [0.0] * n
    for s in stats:
        for i, (m, c, o) in enumerate(zip(s["mass_by_distance"], s["selected_mass_by_distance"],
                                          s["oracle_mass_by_distance"])):
            mass[i] += m
            chosen[i] += c
            best[i] += o
    # recall by distance bucket b (keys 2^b - 1 .. 2^(b+1) - 2 tokens back): share of that bucket's dense mass kept
    merged["recall_by_distance"] = [c / m if m > 0 else math.nan for m, c in zip(mass, chosen)]
    merged["oracle_recall_by_distance"] = [o / m if m > 0 else math.nan for m, o in zip(mass, best)]  # the ceiling's
    return merged
