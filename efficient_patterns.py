"""Structured selection patterns combined with the lightning indexer's top-k (seed "Experiment 4").

A pattern is a list of *levels* over the causal prefix of each query t: a candidate mask (L, L) and a
per-row quota (L,). The indexer's top-k runs inside each level in turn, over tokens no earlier level
took; a level whose candidates fit its quota (a local window) is therefore always kept whole. The last
level takes whatever is left of the pattern's total budget `top_k`, so a row never selects more than
top_k tokens, and a row with t+1 <= top_k keeps its whole prefix when the levels cover it.

Every pattern has TopKTokenSelector's contract: forward(index_scores (B, L, L)) ->
selected_idx (B, L, K) long (-1 = invalid), valid (B, L, K) bool — never a future token.
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn

from adaptive_selection import top_k_per_row
from sparse_attention import causal_attention_probs, future_mask, select_top_k, selection_mask


def distances(L: int, device) -> torch.Tensor:
    """(L, L) long: t - s (negative for future keys)."""
    positions = torch.arange(L, device=device)
    return positions[:, None] - positions[None, :]


def select_levels(scores: torch.Tensor, levels: list, budget: int):
    """Top-k of `scores` (B, L, L) inside each level in turn; a token an earlier level took is no
    candidate again, no level exceeds what is left of `budget`, and the last level takes all of it.

    levels: [(candidates (L, L) bool causal, row_k (L,) long), ..., (candidates, None)].
    Returns selected_idx, valid (B, L, K), K = sum of the levels' largest budgets.
    """
    B, L, _ = scores.shape
    taken = torch.zeros(B, L, L, dtype=torch.bool, device=scores.device)
    used = torch.zeros(B, L, dtype=torch.long, device=scores.device)  # (B, L) slots filled so far
    all_idx, all_valid = [], []
    for candidates, row_k in levels:
        left = (budget - used).clamp_min(0)
        row_k = left if row_k is None else torch.minimum(row_k.expand(B, L), left)
        idx, valid = top_k_per_row(scores.masked_fill(~candidates | taken, float("-inf")), row_k)  # (B, L, k)
        taken |= selection_mask(idx, valid, L)
        used = used + valid.sum(-1)
        all_idx.append(idx)
        all_valid.append(valid)
    valid = torch.cat(all_valid, -1)
    return torch.cat(all_idx, -1).masked_fill(~valid, -1), valid


class CandidatePattern(nn.Module, abc.ABC):
    """Base class: subclasses define `levels(L, device)`; selection is `select_levels` over them."""

    top_k: int

    @abc.abstractmethod
    def levels(self, L: int, device) -> list:
        """The pattern's candidate levels for length L (see `select_levels`)."""

    def forward(self, scores: torch.Tensor):
        """scores (B, L, L) -> selected_idx (B, L, K) long (-1 = invalid), valid (B, L, K) bool."""
        return select_levels(scores, self.levels(scores.shape[-1], scores.device), self.top_k)


def _full(L: int, value: int, device) -> torch.Tensor:
    return torch.full((L,), value, dtype=torch.long, device=device)


def _positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")


class LocalGlobalPattern(CandidatePattern):
    """The last `local_window` tokens (t-w < s <= t) always, plus the indexer's top-`global_k` of the rest.

    Rows shorter than the window hand their unused local slots to the global part (budget w + global_k).
    """

    def __init__(self, local_window: int, global_k: int):
        super().__init__()
        _positive(local_window=local_window)
        if global_k < 0:
            raise ValueError(f"global_k={global_k} must be >= 0")
        self.local_window, self.global_k = local_window, global_k
        self.top_k = local_window + global_k

    def levels(self, L: int, device) -> list:
        d = distances(L, device)
        local = (d >= 0) & (d < self.local_window)
        return [(local, _full(L, self.local_window, device)), (d >= self.local_window, None)]


def span(top_k: int, L: int, factor: float) -> int:
    """A distance span of about factor * top_k keys that scales with k but never reaches the whole prefix
    of an L-token row: at most halfway from top_k to L (k + (L - k) // 2), and at least top_k. At the
    runners' default k = L/2 a factor-2 window is 3/4 of L (not all of it); at a fixed small k it is 2k."""
    return max(top_k, min(math.ceil(factor * top_k), top_k + (L - top_k) // 2))


class SlidingWindowPattern(CandidatePattern):
    """Windows of `window` keys that slide by `stride`: queries in block b = t // stride share the
    window ending at the block's end, [(b+1)*stride - window, (b+1)*stride). The query's own block
    (b*stride <= s <= t) is always kept; the indexer picks the rest of `top_k` inside the window.
    Keys before the window are never selected. window=None: `span(top_k, L, window_factor)` for the
    row length L seen (so the window scales with k and never covers the whole sequence).
    """

    def __init__(self, window: int | None, stride: int, top_k: int, window_factor: float = 2.0):
        super().__init__()
        _positive(stride=stride, top_k=top_k)
        if window is not None:
            _positive(window=window)
            if not stride <= window:
                raise ValueError(f"stride={stride} must be <= window={window}")
        if stride > top_k:
            raise ValueError(f"stride={stride} must be <= top_k={top_k} (the own block is always kept)")
        if window_factor < 1:
            raise ValueError(f"window_factor={window_factor} must be >= 1 (a window holds at least top_k keys)")
        self.window, self.stride, self.top_k, self.window_factor = window, stride, top_k, window_factor

    def window_for(self, L: int) -> int:
        return self.window if self.window is not None else span(self.top_k, L, self.window_factor)

    def levels(self, L: int, device) -> list:
        window = self.window_for(L)
        positions = torch.arange(L, device=device)
        block_start = (positions // self.stride * self.stride)[:, None]  # (L, 1)
        window_start = block_start + self.stride - window
        s = positions[None, :]
        own_block = (s >= block_start) & (s <= positions[:, None])
        in_window = (s >= window_start) & (s < block_start)
        return [(own_block, _full(L, self.stride, device)), (in_window, None)]


def band_quotas(scales: tuple[int, ...], top_k: int) -> list[int]:
    """The budget top_k - scales[0] split evenly over the m bands and the global part, each band's share
    capped by its width -> (m,) band quotas."""
    parts = len(scales)  # the m bands after the local one, and the global part
    remaining = top_k - scales[0]
    even = [remaining // parts + (i < remaining % parts) for i in range(parts)]
    widths = [b - a for a, b in zip(scales, scales[1:])]
    return [min(w, e) for w, e in zip(widths, even)]


class HierarchicalPattern(CandidatePattern):
    """Distance bands local -> global: scales (w0 < w1 < ... < wm) give the local band d < w0 (kept
    whole) and bands [w0, w1), ..., [w(m-1), wm). The budget top_k - w0 is split evenly over those m
    bands and a global part (a band's share capped by its width); the global part, the indexer's best
    remaining tokens at any distance, takes whatever the bands leave.
    """

    def __init__(self, scales, top_k: int):
        super().__init__()
        scales = tuple(int(s) for s in scales)
        _positive(top_k=top_k)
        if not scales or scales[0] <= 0 or any(b <= a for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales={scales} must be positive and strictly increasing")
        if scales[0] > top_k:
            raise ValueError(f"the local scale {scales[0]} must be <= top_k={top_k}")
        self.scales, self.top_k = scales, top_k
        self.band_k = band_quotas(scales, top_k)  # (m,) band quotas

    def scales_for(self, L: int) -> tuple[tuple[int, ...], list[int]]:
        """(scales, band quotas) used for rows of length L."""
        return self.scales, self.band_k

    def levels(self, L: int, device) -> list:
        scales, band_k = self.scales_for(L)
        d = distances(L, device)
        levels = [((d >= 0) & (d < scales[0]), _full(L, scales[0], device))]
        for (near, far), k in zip(zip(scales, scales[1:]), band_k):
            levels.append(((d >= near) & (d < far), _full(L, k, device)))
        levels.append((d >= 0, None))  # global: the rest of the budget, anywhere in the prefix
        return levels


class ScaledHierarchicalPattern(HierarchicalPattern):
    """HierarchicalPattern whose scales are fractions of top_k, squeezed for the row length L seen so the
    outermost band ends at `span(top_k, L, max fraction)` (< L): every band stays a band at k = L/2."""

    def __init__(self, fractions, top_k: int):
        self.fractions = tuple(sorted(float(f) for f in fractions))
        super().__init__(_scales(top_k, self.fractions), top_k)

    def scales_for(self, L: int) -> tuple[tuple[int, ...], list[int]]:
        outer = self.fractions[-1] * self.top_k
        squeeze = min(1.0, span(self.top_k, L, self.fractions[-1]) / outer)
        scales = _scales(self.top_k, [f * squeeze for f in self.fractions])
        return scales, band_quotas(scales, self.top_k)


class StridedPattern(CandidatePattern):
    """Dilated keys s = t, t-stride, t-2*stride, ... (the nearest `strided_k` of them) always, plus the
    indexer's top-k of the other keys for the rest of `top_k` (default strided_k = top_k // 2)."""

    def __init__(self, stride: int, top_k: int, strided_k: int | None = None):
        super().__init__()
        strided_k = max(1, top_k // 2) if strided_k is None else strided_k
        _positive(stride=stride, top_k=top_k, strided_k=strided_k)
        if strided_k > top_k:
            raise ValueError(f"strided_k={strided_k} must be <= top_k={top_k}")
        self.stride, self.top_k, self.strided_k = stride, top_k, strided_k

    def levels(self, L: int, device) -> list:
        d = distances(L, device)
        strided = (d >= 0) & (d % self.stride == 0) & (d < self.stride * self.strided_k)
        return [(strided, _full(L, self.strided_k, device)), ((d >= 0) & ~strided, None)]


def _share(top_k: int, fraction: float) -> int:
    """round(fraction * top_k), at least 1 and at most top_k."""
    return min(top_k, max(1, round(fraction * top_k)))


def _scales(top_k: int, fractions) -> tuple[int, ...]:
    """Distance boundaries fraction * top_k, deduplicated (small k) and with the local one <= top_k."""
    return tuple(sorted({max(1, math.ceil(f * top_k - 1e-9)) for f in fractions}))


# The plan's 13 patterns, each a builder top_k -> selector with total budget top_k (budget-matched
# with plain top-k at the same sparse_top_k). Numbers in names are % of the budget (local share,
# sliding stride) or the number of levels (hierarchical) or the stride in tokens (strided). Sliding
# windows (2k) and hierarchical bands (up to 2k / 4k) scale with k and are squeezed by `span` for the
# row length L, so none covers the whole prefix at the runners' default k = L/2 (tests/test_variants.py
# checks that no two catalogue variants select the same sets there).
PATTERN_BUILDERS = {
    "local_global_10": lambda k: LocalGlobalPattern(_share(k, 0.10), k - _share(k, 0.10)),
    "local_global_25": lambda k: LocalGlobalPattern(_share(k, 0.25), k - _share(k, 0.25)),
    "local_global_50": lambda k: LocalGlobalPattern(_share(k, 0.50), k - _share(k, 0.50)),
    "local_global_75": lambda k: LocalGlobalPattern(_share(k, 0.75), k - _share(k, 0.75)),
    "sliding_s25": lambda k: SlidingWindowPattern(None, _share(k, 0.25), k),
    "sliding_s50": lambda k: SlidingWindowPattern(None, _share(k, 0.50), k),
    "sliding_s100": lambda k: SlidingWindowPattern(None, k, k),
    "hierarchical_3": lambda k: ScaledHierarchicalPattern((0.25, 2), k),
    "hierarchical_4": lambda k: ScaledHierarchicalPattern((0.125, 0.5, 2), k),
    "hierarchical_5": lambda k: ScaledHierarchicalPattern((0.0625, 0.25, 1, 4), k),
    "strided_2": lambda k: StridedPattern(2, k),
    "strided_4": lambda k: StridedPattern(4, k),
    "strided_8": lambda k: StridedPattern(8, k),
}


def build_pattern(name: str, top_k: int) -> CandidatePattern:
    """Selector for a PATTERN_VARIANTS name with total budget top_k."""
    if name not in PATTERN_BUILDERS:
        raise ValueError(f"selection_pattern={name!r} is unknown; choose topk or one of {', '.join(PATTERN_BUILDERS)}")
    return PATTERN_BUILDERS[name](top_k)


# ----------------------------------------------------------------------------- indexer-free controls
class PositionalSelector(nn.Module):
    """Indexer-free selection (a control for DSA): the keys query t keeps depend only on positions (and, for
    the random control, a seeded generator). `select(B, L, device)` -> selected_idx, valid (B, L, K),
    K = min(top_k, L); rows with t+1 <= top_k keep their whole prefix; never a future token."""
    positional = True

    def __init__(self, top_k: int):
        super().__init__()
        if top_k <= 0:
            raise ValueError(f"top_k={top_k} must be > 0")
        self.top_k = top_k


class LocalSelector(PositionalSelector):
    """Each query keeps its last k tokens (t, t-1, ..., t-k+1): a sliding window of width k."""

    def select(self, B: int, L: int, device):
        K = min(self.top_k, L)
        idx = torch.arange(L, device=device)[:, None] - torch.arange(K, device=device)[None, :]  # (L, K)
        valid = (idx >= 0).expand(B, L, K)
        return idx.clamp(min=-1).expand(B, L, K).contiguous(), valid.contiguous()


class RandomSelector(PositionalSelector):
    """Each query keeps k past tokens drawn uniformly without replacement, redrawn at every call from the
    selector's own generator (seeded from the global RNG when the model is built, so a run is reproducible).
    One draw per call is shared by the batch rows (so a row's selection never depends on another row)."""

    CHUNK_ELEMENTS = 1 << 22  # random scores held at once

    def __init__(self, top_k: int):
        super().__init__(top_k)
        self.seed = int(torch.randint(0, 2**31 - 1, ()))
        self.generators: dict = {}

    def select(self, B: int, L: int, device):
        gen = self.generators.setdefault(str(device), torch.Generator(device=device).manual_seed(self.seed))
        K = min(self.top_k, L)
        idx = torch.full((1, L, K), -1, dtype=torch.long, device=device)
        valid = torch.zeros(1, L, K, dtype=torch.bool, device=device)
        chunk = max(1, self.CHUNK_ELEMENTS // L)
        for start in range(0, L, chunk):
            stop = min(L, start + chunk)
            scores = torch.rand(1, stop - start, stop, generator=gen, device=device)
            scores.masked_fill_(future_mask(stop - start, stop, device), float("-inf"))
            idx_c, valid_c = select_top_k(scores, K)  # (B, c, min(K, stop))
            idx[:, start:stop, :idx_c.shape[-1]], valid[:, start:stop, :idx_c.shape[-1]] = idx_c, valid_c
        return idx.expand(B, L, K), valid.expand(B, L, K)


class OracleSelector(PositionalSelector):
    """The selection's ceiling (a control, not a method): query t keeps the top-k keys of the layer's own causal
    attention summed over its heads (q, k detached) — the most attention mass any one index set shared by the heads
    can keep at k. Indexer-free like the positional controls (no indexer, no KL); rows with t+1 <= k keep their
    whole prefix and the other slots are invalid, never a future token. Reads the layer's (q, k): the layer passes
    `attention=(q, k)` (B, H, L, D) because `reads_attention` is set."""
    reads_attention = True
    CHUNK_ELEMENTS = 1 << 24  # attention probabilities (B x H x queries x keys) held at once

    @torch.no_grad()
    def select(self, B: int, L: int, device, attention=None):
        if attention is None:
            raise ValueError("OracleSelector needs the layer's attention inputs: select(B, L, device, attention=(q, k))")
        q, k = (t.detach().float() for t in attention)  # (B, H, L, D); fp32 as selection_recall measures
        K = min(self.top_k, L)
        idx = torch.full((B, L, K), -1, dtype=torch.long, device=device)
        valid = torch.zeros(B, L, K, dtype=torch.bool, device=device)
        chunk = max(1, self.CHUNK_ELEMENTS // (B * q.shape[1] * L))
        for start in range(0, L, chunk):  # query blocks: memory B x H x chunk x L, not x L
            stop = min(L, start + chunk)
            scores = (q[:, :, start:stop] @ k[:, :, :stop].transpose(-1, -2)) * q.shape[-1] ** -0.5
            future = future_mask(stop - start, stop, device)
            mass = scores.masked_fill(future, float("-inf")).softmax(-1).sum(1)  # (B, c, stop) head-summed
            idx_c, valid_c = select_top_k(mass.masked_fill(future, float("-inf")), K)
            idx[:, start:stop, :idx_c.shape[-1]], valid[:, start:stop, :idx_c.shape[-1]] = idx_c, valid_c
        return idx, valid
