"""Levers of the retrofit's indexer that may teach it to retrieve the one far token a copy or a passkey needs
(issue 30). Each is off by default, so the paper's recipe stays the default (retrofit.py reads them):

  structure  always keep the first `sinks` tokens and the last `window` ones (the NSA / DeepSeek-V4 shape) and spend
             the other k - sinks - window slots on the indexer's top-k over the rest; the KL then fits the target
             restricted to those other keys (renormalised): `structured_selection`, `kept_keys`, `WarmupLoss.window`;
             a cached decode step selects its row with `structured_row` (the same rule, `structured_slots`)
  target     one target per layer from the per-head attention: the paper's head sum, the max over the heads of each
             KV group summed over the groups (SeerAttention-R), or the max over all heads; L1-normalised (`head_target`)
  rows       weight each row's KL toward rows whose target mass lies beyond the kept keys (`WarmupLoss.row_weight`)
  features   the indexer key of token s reads its own and the previous token's hidden state (`PrevKeyIndexer`)
  loss       a top-k-membership term beside the KL: cross-entropy of the indexer's softmax against the uniform
             distribution over the target's `rank_top` largest keys (`WarmupLoss.rank_weight`)
  data       training windows where spans of their own text recur at random distances (`splice_recurrences`), so
             rows whose target sits on one far token (an induction head's copy) are common instead of rare

(Capacity — indexer heads x dim — is the indexer's own size: RetrofitLM(heads=, dim=).)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from config import WARMUP_TARGETS as TARGETS
from dsa_lab.kernels.chunked import chunked_select, kept_keys, select_last_rows
from sparse_attention import LightningIndexer, Selection, future_mask, indexer_kl_dense, indexer_kl_sparse, select_top_k


# ----------------------------------------------------------------------------- target
def head_target(probs: torch.Tensor, target: str, group: int) -> torch.Tensor:
    """probs (B, H, R, L) causal attention per head (each row sums to 1), `group` query heads per KV head (adjacent
    heads share one) -> the layer's target (B, R, L), rows L1-normalised. sum: the paper's head sum; group_max: per
    KV group the max over its heads, summed over the groups; head_max: the max over all heads."""
    B, H, R, L = probs.shape
    if target == "sum":
        p = probs.sum(1)
    elif target == "group_max":
        p = probs.view(B, H // group, group, R, L).amax(2).sum(1)
    elif target == "head_max":
        p = probs.amax(1)
    else:
        raise ValueError(f"target={target!r} is unknown; choose one of {', '.join(TARGETS)}")
    return p / p.sum(-1, keepdim=True)


# The retrofit experiment's lever settings (issue 30), each off at its default here (the paper's recipe):
# structure_window (> 0: DSA always keeps the first `sinks` and the last structure_window tokens, the indexer picks the
# other k - sinks - window, and its KL fits the target outside those kept keys), warmup_target (sum | group_max |
# head_max), row_weight / far_window (rows weighted toward target mass outside the kept keys), prev_key (the indexer key
# reads token s - 1 too), rank_weight / rank_top (a top-k-membership term beside the KL), recur_* (data: a recur_share
# of the warm-up's and stage 2's training windows get recur_spans spans of their own text repeated at random
# distances, `Recurrence`; held-out windows and every evaluation stay untouched).
LEVER_DEFAULTS = dict(structure_window=0, warmup_target="sum", row_weight=0.0, far_window=64, prev_key=False,
                      rank_weight=0.0, rank_top=16, recur_share=0.0, recur_spans=4, recur_min=16, recur_max=128,
                      recur_gap=32)


# ----------------------------------------------------------------------------- structure
def sink_local_selection(B: int, L: int, top_k: int, sinks: int, device, rows: torch.Tensor | None = None):
    """The first `sinks` tokens plus the last top_k - sinks; rows with t+1 <= top_k keep their whole prefix.
    rows: the query positions (R,) to select for (default 0..L-1). -> selected_idx (B, R, K) (-1 = invalid), valid;
    K = min(top_k, L)."""
    K = min(top_k, L)
    t = (torch.arange(L, device=device) if rows is None else rows)[:, None]  # (R, 1)
    R = t.shape[0]
    local = t - torch.arange(K, device=device)[None, :]  # (R, K): t, t-1, ...
    if K == top_k and sinks:
        window = t - torch.arange(K - sinks, device=device)[None, :]  # (R, K - sinks)
        with_sinks = torch.cat([torch.arange(sinks, device=device)[None, :].expand(R, sinks), window], dim=1)
        local = torch.where(t + 1 > K, with_sinks, local)  # sinks and window are disjoint when t+1 > K
    valid = local >= 0
    return local.clamp(min=-1).expand(B, R, K).contiguous(), valid.expand(B, R, K).contiguous()


def structured_slots(B: int, L: int, top_k: int, sinks: int, window: int, outside_top_k, device,
                     rows: torch.Tensor | None = None):
    """The structure rule for the query positions `rows` (R,) (default 0..L-1) of a sequence of L: L <= top_k: every
    past token (as dense); else the kept keys (`sink_local_selection` at sinks + window: the first `sinks`, then t,
    t-1, .., t-window+1; a row with t+1 <= sinks + window: its whole prefix, -1 past it) followed by
    outside_top_k(n) -> (idx, valid) (B, R, n): the indexer's top-n over the keys outside `kept_keys` (select_top_k's
    order and ties; -1 where fewer remain). -> selected_idx (B, R, K) (-1 = invalid), valid; K = min(top_k, L)."""
    if L <= top_k:
        return sink_local_selection(B, L, top_k, 0, device, rows)
    kept_idx, kept_valid = sink_local_selection(B, L, sinks + window, sinks, device, rows)  # (B, R, sinks + window)
    idx, valid = outside_top_k(top_k - sinks - window)
    return torch.cat([kept_idx, idx], -1), torch.cat([kept_valid, valid], -1)


def structured_selection(indexer, x: torch.Tensor, top_k: int, sinks: int, window: int,
                         index_dtype: torch.dtype | None = None) -> Selection:
    """x (B, L, d_model) -> a Selection of min(top_k, L) keys per query (`structured_slots`): the kept keys
    (`kept_keys`) and the indexer's top-(top_k - sinks - window) over the others (chunked_select); rows with
    t+1 <= top_k keep their whole prefix. `index_inputs` holds the indexer's projections (for the scores at the
    slots, differentiable). index_dtype: chunked_select's (bf16: the GEMM on bf16-rounded q and k)."""
    B, L, _ = x.shape
    q, k, w = indexer.project(x)

    def outside_top_k(n):  # the indexer's top-n over the keys outside kept_keys
        return chunked_select(q.detach(), k.detach(), w.detach(), n, kept=(sinks, window), index_dtype=index_dtype)
    return Selection(*structured_slots(B, L, top_k, sinks, window, outside_top_k, x.device), index_inputs=(q, k, w))


def structured_row(q, k, w, top_k: int, sinks: int, window: int,
                   index_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A cached decode step's structured selection: the indexer's projections of the query at position T-1, q
    (B, 1, H_I, d_I) and w (B, 1, H_I), and its keys k (B, T, d_I) -> its positions (B, min(top_k, T)), every slot
    valid: `structured_slots` at that row, the set `structured_selection` picks at row T-1 of any sequence of L >= T
    (with the same index_dtype; k may be a bf16 cache)."""
    B, T = k.shape[:2]
    if T > top_k:  # structured_slots' row T-1 in 3 torch ops instead of ~15: the kept keys (sink_local_selection's
        # order: the first `sinks`, then T-1 down to T-window), then the indexer's top-n over the rest (all n valid)
        kept = torch.tensor([*range(sinks), *range(T - 1, T - 1 - window, -1)], device=k.device)
        idx = select_last_rows(q, k, w, top_k - sinks - window, kept=(sinks, window), index_dtype=index_dtype)[0]
        return torch.cat([kept.expand(B, -1), idx[:, 0]], dim=-1)
    pos = torch.arange(T - 1, T, device=k.device)  # (1,): no host-to-device copy

    def outside_top_k(n):  # the row's top-n over its keys outside kept_keys (every cached key is past)
        return select_last_rows(q, k, w, n, kept=(sinks, window), index_dtype=index_dtype)
    return structured_slots(B, T, top_k, sinks, window, outside_top_k, k.device, rows=pos)[0][:, 0]


def kept_slots(selected_idx: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """selected_idx (B, L, K) of a sequence's rows 0..L-1 -> (B, L, K) bool: the slots holding an always-kept key."""
    t = torch.arange(selected_idx.shape[1], device=selected_idx.device)[None, :, None]
    return (selected_idx < sinks) | (selected_idx > t - window)


class StructuredTopKSelector(nn.Module):
    """The structure lever as a toy model's selector over full index scores (the reference selection path):
    `structured_slots` with the kept keys and the top-(top_k - sinks - window) of the scores outside them — the set
    `structured_selection` picks from the same indexer (chunked, no L x L scores)."""

    def __init__(self, top_k: int, sinks: int, window: int):
        super().__init__()
        if window <= 0 or sinks < 0 or sinks + window >= top_k:
            raise ValueError(f"top_k={top_k}, sinks={sinks}, window={window}: need window > 0, sinks >= 0 and "
                             f"sinks + window < top_k (the indexer needs slots of its own)")
        self.top_k, self.sinks, self.window = top_k, sinks, window

    def forward(self, scores: torch.Tensor):
        """scores (B, L, L) -> selected_idx (B, L, K) long (-1 = invalid), valid (B, L, K), K = min(top_k, L)."""
        B, L, _ = scores.shape
        pos = torch.arange(L, device=scores.device)
        forbidden = future_mask(L, L, scores.device) | kept_keys(pos, L, self.sinks, self.window)  # (L, L)
        outside = scores.masked_fill(forbidden, float("-inf"))
        return structured_slots(B, L, self.top_k, self.sinks, self.window, lambda n: select_top_k(outside, n),
                                scores.device)


# ----------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class WarmupLoss:
    """The warm-up's loss per layer. Default: the paper's KL over every causal key, mean over rows.
    window > 0 (structure): the KL over the keys outside `kept_keys(sinks, window)`, target renormalised there (rows
    with no target mass there are left out); row_weight a in [0, 1]: rows weighted (1 - a) + a * m_t / mean(m), m_t
    the target mass outside the kept keys (of `window`, or of `far_window` without structure); rank_weight: times the
    membership term over the target's `rank_top` largest keys (on the same support as the KL)."""
    sinks: int = 4
    window: int = 0
    row_weight: float = 0.0
    far_window: int = 64
    rank_weight: float = 0.0
    rank_top: int = 16

    def __post_init__(self):
        if self.sinks < 0 or self.window < 0 or self.far_window < 1 or self.rank_top < 1 or self.rank_weight < 0:
            raise ValueError(f"{self}: sinks, window >= 0, far_window, rank_top >= 1, rank_weight >= 0")
        if not 0 <= self.row_weight <= 1:
            raise ValueError(f"row_weight={self.row_weight} must lie in [0, 1]")

    @property
    def is_paper(self) -> bool:
        return not (self.window or self.row_weight or self.rank_weight)


def warmup_loss(p: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor | None, loss: WarmupLoss) -> torch.Tensor:
    """p (B, R, L) the target, scores (B, R, L) index scores with -inf future, rows (R,) their query positions (None:
    0..L-1) -> the scalar loss `loss` describes (exactly `indexer_kl_dense` for the paper's)."""
    if loss.is_paper:
        return indexer_kl_dense(p[:, None], scores)
    L = p.shape[-1]
    pos = rows if rows is not None else torch.arange(L, device=p.device)
    causal = torch.isfinite(scores)
    far = causal & ~kept_keys(pos, L, loss.sinks, loss.window or loss.far_window)  # (B, R, L)
    support = far if loss.window else causal
    support = torch.where(support.any(-1, keepdim=True), support, causal)  # a row without support: no NaN, weight 0
    p_s = p * support
    mass = p_s.sum(-1)  # (B, R)
    p_n = p_s / mass.clamp_min(1e-30)[..., None]
    log_q = scores.masked_fill(~support, float("-inf")).log_softmax(-1)
    kl = torch.where(p_n > 0, p_n * (p_n.clamp_min(1e-30).log() - log_q), torch.zeros_like(p_n)).sum(-1)  # (B, R)
    weight = (p * far).sum(-1) > 0 if loss.window else torch.ones_like(mass, dtype=torch.bool)
    weight = weight.float()
    if loss.row_weight:
        m = (p * far).sum(-1)
        weight = weight * ((1 - loss.row_weight) + loss.row_weight * m / m.mean().clamp_min(1e-30))
    total = weight.sum().clamp_min(1e-30)
    out = (weight * kl).sum() / total
    if loss.rank_weight:
        out = out + loss.rank_weight * (weight * membership(p_n, log_q, loss.rank_top)).sum() / total
    return out


def membership(p: torch.Tensor, log_q: torch.Tensor, top: int) -> torch.Tensor:
    """p (B, R, L) target, log_q (B, R, L) the indexer's log-softmax -> per row (B, R): cross-entropy of log_q against
    the uniform distribution over p's `top` largest keys with p > 0 (0 for a row with none)."""
    val, idx = p.topk(min(top, p.shape[-1]), dim=-1)
    member = val > 0
    picked = torch.where(member, log_q.gather(-1, idx), torch.zeros_like(val))
    return -picked.sum(-1) / member.sum(-1).clamp_min(1)


@dataclass(frozen=True)
class IndexerObjective:
    """A toy DSA layer's indexer losses under the levers (ModelConfig's structure_* and warmup_target): the warm-up's
    `warmup_loss` on `head_target`, and stage 2's KL over the selected slots outside the always-kept keys (the head
    sum there, as the retrofit's stage 2)."""
    target: str = "sum"
    group: int = 1  # query heads per KV head (head_target's group_max)
    loss: WarmupLoss = WarmupLoss()

    def dense(self, probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """probs (B, H, L, L) causal attention (detached), scores (B, L, L) -inf future -> the warm-up loss."""
        return warmup_loss(head_target(probs, self.target, self.group), scores, None, self.loss)

    def sparse(self, selected_probs: torch.Tensor, selected_scores: torch.Tensor, selection: Selection) -> torch.Tensor:
        """selected_probs (B, H, L, K) (detached), selected_scores (B, L, K) -> stage 2's KL."""
        slots = selection.valid
        if self.loss.window:
            slots = slots & ~kept_slots(selection.selected_idx, self.loss.sinks, self.loss.window)
        return indexer_kl_sparse(selected_probs, selected_scores, slots)


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Recurrence:
    """The data lever: each training window, with probability `share`, gets `spans` recurrences; a recurrence copies
    m ~ U[min_span, max_span] tokens of the window's own text to a later place at least `min_gap` tokens after the
    copied span ends, one destination per equal segment of the window (a segment too short for m is left alone)."""
    share: float = 0.0
    spans: int = 4
    min_span: int = 16
    max_span: int = 128
    min_gap: int = 32

    def __post_init__(self):
        if not 0 <= self.share <= 1:
            raise ValueError(f"recur_share={self.share} must lie in [0, 1] (the share of windows with recurrences)")
        if self.spans < 1 or not 1 <= self.min_span <= self.max_span or self.min_gap < 0:
            raise ValueError(f"{self}: spans >= 1, 1 <= min_span <= max_span, min_gap >= 0")


def splice_recurrences(windows: torch.Tensor, rec: Recurrence, generator: torch.Generator
                       ) -> tuple[torch.Tensor, list]:
    """windows (B, N) token ids -> (a copy (B, N) where the windows `rec` picks hold recurring spans of their own
    text, the placements [(b, source start, destination start, m)]). Destinations are written front to back and
    each source lies before its destination, so no later write changes a copied source."""
    out, placed = windows.clone(), []
    B, N = out.shape
    segment = N // rec.spans

    def draw(lo: int, hi: int) -> int:  # uniform in [lo, hi]
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    for b in range(B):
        if rec.share < 1 and float(torch.rand(1, generator=generator)) >= rec.share:
            continue
        for i in range(rec.spans):
            m = draw(rec.min_span, rec.max_span)
            lo, hi = max(i * segment, m + rec.min_gap), (i + 1) * segment - m
            if lo > hi:
                continue
            dest = draw(lo, hi)
            src = draw(0, dest - m - rec.min_gap)
            out[b, dest:dest + m] = out[b, src:src + m]
            placed.append((b, src, dest, m))
    return out, placed


# ----------------------------------------------------------------------------- features
class PrevKeyIndexer(LightningIndexer):
    """A lightning indexer whose key of token s reads x_s and x_{s-1}: k[s] = LN(W_k x_s + W_p x_{s-1}) (x_{-1} = 0),
    so a query can match "the token after an earlier occurrence of mine" (what an induction head does). W_p starts
    at zero (`reset_parameters`): the indexer starts as the plain one with the same other weights. Full-sequence
    forwards only (the key of the first token of a chunk would need the token before it)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, rope_dim: int, max_seq_len: int,
                 rope_base: float = 10000.0):
        super().__init__(d_model, n_heads, head_dim, rope_dim, max_seq_len, rope_base)
        self.prev_proj = nn.Parameter(torch.zeros(head_dim, d_model))  # (d_I, d_model)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.prev_proj.zero_()

    def key_features(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        if start:
            raise ValueError("the previous-token indexer key needs the whole sequence (start=0); decode is not "
                             "supported with prev_key indexers")
        previous = torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]  # (B, L, d_model): x_{s-1}, zeros at s = 0
        return self.k_proj(x) + previous @ self.prev_proj.T
