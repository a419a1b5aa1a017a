"""Cheaper lightning indexers (seed "Experiment 4"): smaller sizes, low precision, a two-scale
(block -> token) indexer. (Cross-layer sharing and the factories that build a layer's indexer and
selector from ModelConfig live in models.py.)

All keep LightningIndexer's contract: x (B, L, d_model) -> causal index scores (B, L, L), -inf at s > t.
"""
from __future__ import annotations

import torch
from torch import nn

from quantization_utils import (check_precision, indexer_autocast, precision_index_scores,
                                quantize_indexer_inputs)
from sparse_attention import LightningIndexer

MULTISCALE_CANDIDATE_FACTOR = 2  # regions hold about this many times sparse_top_k tokens


class OptimizedLightningIndexer(LightningIndexer):
    """LightningIndexer with a size of your choice and a score precision (quantization_utils).

    `precision` can be switched after construction (e.g. to measure its error on a trained indexer).
    """
    fast_selectable = False  # scores come from precision_index_scores, not index_scores

    def __init__(self, d_model: int, heads: int = 2, dim: int = 32, precision: str = "fp32",
                 rope_dim: int | None = None, max_seq_len: int = 2048, rope_base: float = 10000.0):
        check_precision(precision)
        rope_dim = dim // 4 * 2 if rope_dim is None else rope_dim  # half the dims, kept even
        super().__init__(d_model, heads, dim, rope_dim, max_seq_len, rope_base)
        self.precision = precision

    def project(self, x: torch.Tensor, start: int = 0):
        """x (B, L, d_model) -> q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I) as the score product sees them."""
        with indexer_autocast(self.precision, x.device.type):
            q, k, w = super().project(x, start)
        return quantize_indexer_inputs(q, k, w, self.precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) -> causal index scores (B, L, L) fp32, -inf where s > t."""
        return precision_index_scores(*self.project(x), self.precision)


def region_budget(top_k: int, L: int) -> int:
    """Tokens the multi-scale regions of a query hold: about MULTISCALE_CANDIDATE_FACTOR x top_k, but never
    more than halfway from top_k to L (so at k = L/2 the regions are 3/4 of the prefix, not all of it)."""
    return max(top_k, min(MULTISCALE_CANDIDATE_FACTOR * top_k, top_k + (L - top_k) // 2))


def region_blocks(top_k: int, L: int, block_size: int) -> int:
    """Complete past blocks a query's regions take besides its own block, derived from k and L: the regions
    (these blocks + the own one) hold about `region_budget(top_k, L)` tokens (at least one past block)."""
    return max(1, region_budget(top_k, L) // block_size - 1)


def check_multiscale(top_k: int, L: int, block_size: int) -> None:
    """Refuse (ValueError) a multi-scale configuration whose regions cover the whole L-token prefix: there
    it selects exactly like plain top-k. (A forward with such a k still runs — k >= L must equal dense.)"""
    blocks = region_blocks(top_k, L, block_size)
    if (blocks + 1) * block_size >= L:
        raise ValueError(f"multiscale_block={block_size} at sparse_top_k={top_k} and L={L}: {blocks} region "
                         f"block(s) + the own block cover the whole prefix, so multi-scale would select like plain "
                         f"top-k; use a smaller multiscale_block (<= {max(2, region_budget(top_k, L) // 3)}) "
                         f"or a smaller k")


class MultiScaleIndexer(OptimizedLightningIndexer):
    """Two scales from one projection. Fine: the usual token scores (forward; the KL losses train them as
    usual). Coarse: each query scores the mean-pooled key of every *completed* block of `block_size` tokens
    ((j+1)*block_size <= t+1, so only past keys are pooled) with the same q, w.

    `scores_and_coarse(x)` returns both; RegionRestrictedSelector, which knows k and L, turns the coarse
    scores into the query's regions (its best blocks and its own, partial block) and selects only inside them.
    Nothing is kept on the module between calls.
    """

    def __init__(self, d_model: int, heads: int, dim: int, block_size: int, **kwargs):
        super().__init__(d_model, heads, dim, **kwargs)
        if block_size < 2:
            raise ValueError(f"block_size={block_size} must be >= 2")
        self.block_size = block_size

    def scores_and_coarse(self, x: torch.Tensor):
        """x (B, L, d_model) -> fine scores (B, L, L) fp32 (-inf where s > t), coarse block scores
        (B, L, L // block_size) (no gradient; -inf for a block not yet complete at query t)."""
        q, k, w = self.project(x)
        coarse = self.block_scores(q.detach(), k.detach(), w.detach())
        return precision_index_scores(q, k, w, self.precision), coarse

    @torch.no_grad()
    def block_scores(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I) -> coarse scores (B, L, L // block_size) of the
        mean-pooled complete blocks, -inf for a block not yet complete at query t."""
        B, L, d = k.shape
        b = self.block_size
        n_blocks = L // b  # blocks that are complete for some query
        positions = torch.arange(L, device=k.device)
        pooled = k[:, : n_blocks * b].float().view(B, n_blocks, b, d).mean(2)  # (B, nb, d_I)
        per_head = torch.einsum("bthd,bjd->bthj", q.float(), pooled).relu()  # (B, L, H_I, nb)
        coarse = torch.einsum("bthj,bth->btj", per_head, w.float())  # (B, L, nb)
        complete = (torch.arange(n_blocks, device=k.device)[None, :] + 1) * b <= positions[:, None] + 1
        return coarse.masked_fill(~complete, float("-inf"))


@torch.no_grad()
def region_mask(coarse_scores: torch.Tensor, top_blocks: int, block_size: int) -> torch.Tensor:
    """coarse_scores (B, L, nb) -> (B, L, L) bool, True at causal keys inside the query's regions: its own
    block and its best `top_blocks` complete blocks."""
    B, L, n_blocks = coarse_scores.shape
    b = block_size
    positions = torch.arange(L, device=coarse_scores.device)
    block_of_key = positions // b  # (L,)
    regions = torch.zeros(B, L, L // b + 1, dtype=torch.bool, device=coarse_scores.device)
    regions[:, positions, block_of_key] = True  # the query's own block
    if n_blocks:
        values, best = coarse_scores.topk(min(top_blocks, n_blocks), dim=-1)  # (B, L, r)
        regions.scatter_(-1, torch.where(torch.isfinite(values), best, block_of_key[:, None].expand_as(best)), True)
    in_region = regions.gather(-1, block_of_key.expand(B, L, L))  # (B, L, L): key s's block chosen?
    return in_region & (positions[None, :] <= positions[:, None])


class RegionRestrictedSelector(nn.Module):
    """Any selector, restricted to the regions of a MultiScaleIndexer's coarse scores (passed with the fine
    scores: forward(scores, coarse_scores)). The number of region blocks comes from this selector's k and the
    scores' length L (`region_blocks`), capped by `top_blocks` when given."""
    reads_coarse = True  # reference_select hands it the indexer's coarse scores (sparse_attention)

    def __init__(self, selector: nn.Module, block_size: int, top_blocks: int | None = None):
        super().__init__()
        if top_blocks is not None and top_blocks < 1:
            raise ValueError(f"top_blocks={top_blocks} must be >= 1 (or None: derived from k and L)")
        self.selector, self.block_size, self.top_blocks = selector, block_size, top_blocks

    @property
    def top_k(self) -> int:
        return self.selector.top_k

    def regions_for(self, L: int) -> int:
        """Past blocks chosen per query at this selector's k and length L."""
        blocks = region_blocks(self.top_k, L, self.block_size)
        return blocks if self.top_blocks is None else min(blocks, self.top_blocks)

    def region_mask(self, coarse_scores: torch.Tensor) -> torch.Tensor:
        """coarse_scores (B, L, nb) -> (B, L, L) bool: the regions at this selector's k."""
        return region_mask(coarse_scores, self.regions_for(coarse_scores.shape[1]), self.block_size)

    def forward(self, scores: torch.Tensor, coarse_scores: torch.Tensor | None = None):
        """scores (B, L, L), coarse_scores (B, L, L // block_size) of the same forward -> the selector's output."""
        L = scores.shape[-1]
        if coarse_scores is None or coarse_scores.shape != (*scores.shape[:2], L // self.block_size):
            got = None if coarse_scores is None else tuple(coarse_scores.shape)
            raise ValueError(f"multi-scale selection needs the indexer's coarse scores of the same forward "
                             f"(B, L, L // {self.block_size}) beside the scores {tuple(scores.shape)}, got {got}: "
                             f"pass MultiScaleIndexer.scores_and_coarse(x)")
        return self.selector(scores.masked_fill(~self.region_mask(coarse_scores), float("-inf")))
