"""Cheaper lightning indexers (seed "Experiment 4"): smaller sizes, low precision, one indexer shared
by a group of layers, a two-scale (block -> token) indexer, and the factories that build a layer's
indexer and selector from ModelConfig.

All keep LightningIndexer's contract: x (B, L, d_model) -> causal index scores (B, L, L), -inf at s > t.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from quantization_utils import (check_precision, indexer_autocast, precision_index_scores,
                                quantize_indexer_inputs)
from sparse_attention import LightningIndexer, TopKTokenSelector

# Indexer sizes: the plan's named four and the full heads x dims grid. Values are ModelConfig overrides
# (RoPE on half of the indexer dims, as in the default 4 x 64 / 32).
_NAMED_SIZES = {"baseline": (4, 64), "light": (2, 32), "minimal": (1, 16), "ultra_light": (1, 8)}
_GRID_SIZES = {f"h{h}d{d}": (h, d) for h in (1, 2, 3, 4) for d in (8, 16, 32, 64)}
INDEXER_VARIANTS: dict[str, dict] = {
    name: dict(indexer_heads=heads, indexer_dim=dim, indexer_rope_dim=dim // 4 * 2)
    for name, (heads, dim) in {**_NAMED_SIZES, **_GRID_SIZES}.items()
}
# Cross-layer sharing ("caching"): groups of n consecutive layers use the first layer's indexer scores.
SHARED_INDEXER_VARIANTS: dict[str, dict] = {f"shared_{n}": {"shared_indexer_group": n} for n in (2, 4)}
# Two-scale indexer: blocks of n tokens scored first, tokens scored inside the best blocks.
MULTISCALE_VARIANTS: dict[str, dict] = {f"multiscale_{n}": {"multiscale_block": n} for n in (8, 16)}
MULTISCALE_CANDIDATE_FACTOR = 2  # regions hold about this many times sparse_top_k tokens


class OptimizedLightningIndexer(LightningIndexer):
    """LightningIndexer with a size of your choice and a score precision (quantization_utils).

    `precision` can be switched after construction (e.g. to measure its error on a trained indexer).
    """

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


# ----------------------------------------------------------------------------- cross-layer sharing
class SharedScores:
    """The index scores a group leader's indexer produced in the current model forward."""

    def __init__(self):
        self.scores: torch.Tensor | None = None

    def store(self, module, inputs, output) -> None:  # forward hook on the leader's indexer
        self.scores = output

    def clear(self) -> None:
        self.scores = None


class SharedIndexerScores(nn.Module):
    """A follower layer's indexer: no parameters, no compute — it returns its group leader's scores
    (computed from the leader layer's input, so causal). The followers' KL losses reach the leader's
    indexer through these scores, so the shared indexer is trained on every layer of its group."""

    def __init__(self, shared: SharedScores):
        super().__init__()
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.shared.scores
        if scores is None or scores.shape != (x.shape[0], x.shape[1], x.shape[1]):
            raise RuntimeError("shared indexer scores are missing: the group's first layer must compute its "
                               "indexer scores earlier in the same forward (same sparse/loss/stats switches)")
        return scores


def share_indexers(attentions: list, group: int) -> list[SharedScores]:
    """Layers [0..group-1], [group..2*group-1], ... share the first layer's indexer. Returns the caches
    (the model clears them around each forward). group 1: nothing shared."""
    caches = []
    for start in range(0, len(attentions), group):
        leader, followers = attentions[start], attentions[start + 1: start + group]
        if not followers:  # group 1, or a last group of one layer
            continue
        cache = SharedScores()
        leader.indexer.register_forward_hook(cache.store)
        for attn in followers:
            attn.indexer = SharedIndexerScores(cache)
            if isinstance(attn.selector, RegionRestrictedSelector):
                object.__setattr__(attn.selector, "region_source", leader.indexer)
        caches.append(cache)
    return caches


# ----------------------------------------------------------------------------- factories
def build_indexer(cfg) -> nn.Module:
    """A layer's indexer from ModelConfig (the plain LightningIndexer for the default fields)."""
    sizes = (cfg.d_model, cfg.indexer_heads, cfg.indexer_dim)
    common = dict(precision=cfg.indexer_precision, rope_dim=cfg.indexer_rope_dim,
                  max_seq_len=cfg.max_seq_len, rope_base=cfg.rope_base)
    if cfg.multiscale_block:
        top_blocks = max(1, math.ceil(MULTISCALE_CANDIDATE_FACTOR * cfg.sparse_top_k / cfg.multiscale_block))
        return MultiScaleIndexer(*sizes, block_size=cfg.multiscale_block, top_blocks=top_blocks, **common)
    if cfg.indexer_precision != "fp32" or cfg.shared_indexer_group > 1:  # a shared leader must run forward
        return OptimizedLightningIndexer(*sizes, **common)  # (the plain indexer may take a chunked fast path)
    return LightningIndexer(*sizes, cfg.indexer_rope_dim, cfg.max_seq_len, cfg.rope_base)


def build_selector(cfg, indexer: nn.Module) -> nn.Module:
    """A layer's selector from ModelConfig: k strategy, else pattern, else plain top-k; restricted to
    the indexer's regions when it is a MultiScaleIndexer."""
    if cfg.k_strategy != "fixed":
        from adaptive_selection import build_k_selector
        selector = build_k_selector(cfg.k_strategy, cfg.sparse_top_k)
    elif cfg.selection_pattern != "topk":
        from efficient_patterns import build_pattern
        selector = build_pattern(cfg.selection_pattern, cfg.sparse_top_k)
    else:
        selector = TopKTokenSelector(cfg.sparse_top_k)
    if isinstance(indexer, MultiScaleIndexer):
        selector = RegionRestrictedSelector(selector, indexer)
    return selector


# ----------------------------------------------------------------------------- parameter counts
def indexer_param_count(d_model: int, heads: int, dim: int) -> int:
    """Parameters of one indexer: q_proj d*H*d_I + k_proj d*d_I + LayerNorm 2*d_I + weights_proj d*H."""
    return d_model * heads * dim + d_model * dim + 2 * dim + d_model * heads


def indexer_parameter_report(model) -> dict:
    """Indexer parameters of a SparseAttentionMoELLM and their share of all its parameters."""
    indexer = sum(p.numel() for p in model.indexer_parameters())
    total = sum(p.numel() for p in model.parameters())
    owners = sum(1 for a in model.attentions if not isinstance(a.indexer, SharedIndexerScores))
    return {"indexer_params": indexer, "total_params": total, "indexer_share": indexer / total,
            "indexers": owners, "params_per_indexer": indexer // max(1, owners)}


def variant_parameter_reports(base_cfg, variants: dict | None = None) -> dict[str, dict]:
    """{variant name: indexer_parameter_report + reduction vs base_cfg's indexer} for ModelConfig
    override dicts (default INDEXER_VARIANTS + SHARED_INDEXER_VARIANTS). Models are built on the meta
    device: no memory, no time."""
    import dataclasses

    from models import SparseAttentionMoELLM  # models imports this module's users; keep the import here

    variants = {**INDEXER_VARIANTS, **SHARED_INDEXER_VARIANTS} if variants is None else variants
    with torch.device("meta"):
        base = indexer_parameter_report(SparseAttentionMoELLM(base_cfg))["indexer_params"]
        reports = {}
        for name, overrides in variants.items():
            report = indexer_parameter_report(SparseAttentionMoELLM(dataclasses.replace(base_cfg, **overrides)))
            report["indexer_param_reduction"] = 1 - report["indexer_params"] / base
            reports[name] = report
    return reports
