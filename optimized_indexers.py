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

    def project(self, x: torch.Tensor):
        """x (B, L, d_model) -> q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I) as the score product sees them."""
        with indexer_autocast(self.precision, x.device.type):
            q, k, w = super().project(x)
        return quantize_indexer_inputs(q, k, w, self.precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) -> causal index scores (B, L, L) fp32, -inf where s > t."""
        return precision_index_scores(*self.project(x), self.precision)


class MultiScaleIndexer(OptimizedLightningIndexer):
    """Two scales. Coarse: each query scores the mean-pooled key of every *completed* block of
    `block_size` tokens ((j+1)*block_size <= t+1, so only past keys are pooled) with the same q, w and
    picks the best `top_blocks`; its own, partial block is always a region. Fine: the usual token scores.

    forward returns the fine scores everywhere (the KL losses train them as usual) and leaves the
    region mask in `last_region_mask` (B, L, L); RegionRestrictedSelector selects only inside it.
    """

    def __init__(self, d_model: int, heads: int, dim: int, block_size: int, top_blocks: int, **kwargs):
        super().__init__(d_model, heads, dim, **kwargs)
        if block_size < 2 or top_blocks < 1:
            raise ValueError(f"block_size={block_size} must be >= 2 and top_blocks={top_blocks} >= 1")
        self.block_size, self.top_blocks = block_size, top_blocks
        self.last_region_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, w = self.project(x)
        self.last_region_mask = self.region_mask(q.detach(), k.detach(), w.detach())
        return precision_index_scores(q, k, w, self.precision)

    @torch.no_grad()
    def region_mask(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I) -> (B, L, L) bool, True at causal keys inside
        the query's regions."""
        B, L, d = k.shape
        b = self.block_size
        n_blocks = L // b  # blocks that are complete for some query
        positions = torch.arange(L, device=k.device)
        block_of_key = positions // b  # (L,)
        regions = torch.zeros(B, L, L // b + 1, dtype=torch.bool, device=k.device)  # (B, L, blocks incl. partial)
        regions[:, positions, block_of_key] = True  # the query's own block
        if n_blocks:
            pooled = k[:, : n_blocks * b].float().view(B, n_blocks, b, d).mean(2)  # (B, nb, d_I)
            per_head = torch.einsum("bthd,bjd->bthj", q.float(), pooled).relu()  # (B, L, H_I, nb)
            coarse = torch.einsum("bthj,bth->btj", per_head, w.float())  # (B, L, nb)
            complete = (torch.arange(n_blocks, device=k.device)[None, :] + 1) * b <= positions[:, None] + 1
            coarse = coarse.masked_fill(~complete, float("-inf"))
            values, best = coarse.topk(min(self.top_blocks, n_blocks), dim=-1)  # (B, L, r)
            regions.scatter_(-1, torch.where(torch.isfinite(values), best, block_of_key[:, None].expand_as(best)), True)
        in_region = regions.gather(-1, block_of_key.expand(B, L, L))  # (B, L, L): key s's block chosen?
        return in_region & (positions[None, :] <= positions[:, None])


class RegionRestrictedSelector(nn.Module):
    """Any selector, restricted to the regions `region_source.last_region_mask` (a MultiScaleIndexer's)."""

    def __init__(self, selector: nn.Module, region_source: MultiScaleIndexer):
        super().__init__()
        self.selector = selector
        object.__setattr__(self, "region_source", region_source)  # not a submodule: owned by its layer

    @property
    def top_k(self) -> int:
        return self.selector.top_k

    def forward(self, scores: torch.Tensor):
        mask = self.region_source.last_region_mask
        if mask is None or mask.shape != scores.shape:
            raise RuntimeError("multi-scale region mask is missing or stale: the MultiScaleIndexer's forward "
                               "must run right before this selector")
        return self.selector(scores.masked_fill(~mask, float("-inf")))


# ----------------------------------------------------------------------------- parameter counts
def indexer_param_count(d_model: int, heads: int, dim: int) -> int:
    """Parameters of one indexer: q_proj d*H*d_I + k_proj d*d_I + LayerNorm 2*d_I + weights_proj d*H."""
    return d_model * heads * dim + d_model * dim + 2 * dim + d_model * heads
