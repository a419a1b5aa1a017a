"""The adaptive-sparsity models (seed "Experiment 3"), MHA or MLA (ModelConfig.attention_type):

  AdaptiveMoELLM     DSA whose per-query k comes from a DynamicSparsityController in every layer
                     (sparsity_control.py: prefix complexity + index-score entropy -> k_t)
  FixedSparseMoELLM  DSA keeping a fixed share of the causal prefix, k_t = ceil(fraction (t+1)) (the 25/50/75 %
                     baselines), or the share whose mean keys per query at max_seq_len equals a given budget
                     (`mean_keys`: the budget-matched baseline)

Both are SparseAttentionMoELLM subclasses with its parameter names (the controller and the share have no
parameters), so `train.sparse_from_state(cfg, dense_state, seed, build=...)` branches them from a dense model.
Selection goes through the reference path (full index scores, per-row k as top-k_max with the tail slots
invalid); the attention over the selected keys through the configured token-level backend.
"""
from __future__ import annotations

import contextlib

import torch

from adaptive_selection import AdaptiveKSelector
from config import ModelConfig
from models import SparseAttentionMoELLM, SparseLatentAttention, build_backend, build_indexer
from sparse_attention import AttentionMode, DeepSeekSparseAttention
from sparsity_control import AdaptiveKConfig, ContentComplexityAnalyzer, DynamicSparsityController, ratio_for_mean_keys

TOKEN_LEVEL_BACKENDS = ("masked", "gather", "triton")


def check_plain_dsa(cfg: ModelConfig, model: str) -> None:
    """These models replace the selector of plain token-level DSA: refuse the options that replace it too."""
    others = {"selection_pattern": "topk", "k_strategy": "fixed", "shared_indexer_group": 1, "multiscale_block": 0,
              "selection_source": "indexer"}
    clash = [f"{name}={getattr(cfg, name)!r}" for name, default in others.items() if getattr(cfg, name) != default]
    if cfg.attention_backend not in TOKEN_LEVEL_BACKENDS:
        clash.append(f"attention_backend={cfg.attention_backend!r}")
    if clash:
        raise ValueError(f"{model} sets k per query itself and cannot be combined with {', '.join(clash)}; use the "
                         f"defaults of those keys and attention_backend one of {', '.join(TOKEN_LEVEL_BACKENDS)}")


def _layer_class(cfg: ModelConfig, mha, mla):
    return mla if cfg.attention_type == "mla" else mha


class _ObservesInput:
    """A DSA layer whose selector is a DynamicSparsityController: the layer's input (the hidden states the
    controller measures) is handed to it for the span of one forward."""

    def forward(self, x: torch.Tensor, mode: AttentionMode = AttentionMode(), shared_scores=None):
        with self.selector.observing(hidden=x.detach()):
            return super().forward(x, mode, shared_scores)


class AdaptiveSparseAttention(_ObservesInput, DeepSeekSparseAttention):
    """MHA DSA with the controller's k_t."""


class AdaptiveSparseLatentAttention(_ObservesInput, SparseLatentAttention):
    """MLA DSA (MQA mode) with the controller's k_t."""


class AdaptiveMoELLM(SparseAttentionMoELLM):
    """DSA + MoE with k_t per query, sequence and layer from the controller (see sparsity_control.py)."""

    def __init__(self, cfg: ModelConfig, k_config: AdaptiveKConfig = AdaptiveKConfig()):
        k_config.validate()
        self.k_config = k_config
        self.analyzer = ContentComplexityAnalyzer(cfg.vocab_size, k_config)
        super().__init__(cfg)

    def build_attention(self, cfg: ModelConfig, layer: int, earlier: list) -> torch.nn.Module:
        check_plain_dsa(cfg, "AdaptiveMoELLM")
        controller = DynamicSparsityController(self.k_config, self.analyzer, layer)
        cls = _layer_class(cfg, AdaptiveSparseAttention, AdaptiveSparseLatentAttention)
        return cls(cfg, build_indexer(cfg), controller, build_backend(cfg))

    @property
    def controllers(self) -> list[DynamicSparsityController]:
        return [attention.selector for attention in self.attentions]

    def forward(self, input_ids: torch.Tensor, mode: AttentionMode | None = None, return_aux: bool = False):
        """As SparseAttentionMoELLM; the token features of input_ids (B, L) are computed once and observed by
        every layer's controller."""
        if not (self.default_mode if mode is None else mode).needs_indexer:
            return super().forward(input_ids, mode, return_aux)
        tokens = self.analyzer.token_features(input_ids)  # (B, L, 2)
        with contextlib.ExitStack() as stack:
            for controller in self.controllers:
                stack.enter_context(controller.observing(tokens=tokens))
            return super().forward(input_ids, mode, return_aux)

    @contextlib.contextmanager
    def recording_k(self):
        """Yields {layer: [one record per forward]} (DynamicSparsityController.recording) while open."""
        with contextlib.ExitStack() as stack:
            yield {c.layer: stack.enter_context(c.recording()) for c in self.controllers}


class FixedSparseMoELLM(SparseAttentionMoELLM):
    """DSA + MoE keeping k_t = ceil(fraction (t+1)) keys for query t. Give `fraction` (0, 1], or `mean_keys`:
    then the fraction is the prefix share whose mean keys per query at length `budget_len` (default
    cfg.max_seq_len) is closest to mean_keys (sparsity_control.ratio_for_mean_keys)."""

    def __init__(self, cfg: ModelConfig, fraction: float | None = None, mean_keys: float | None = None,
                 budget_len: int | None = None):
        if (fraction is None) == (mean_keys is None):
            raise ValueError("FixedSparseMoELLM needs exactly one of fraction (a share of the prefix) or mean_keys "
                             "(a budget of keys per query)")
        if mean_keys is not None:
            fraction = ratio_for_mean_keys(budget_len or cfg.max_seq_len, mean_keys)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must be in (0, 1] (a share of the causal prefix)")
        self.fraction, self.mean_keys = float(fraction), mean_keys
        super().__init__(cfg)

    def build_attention(self, cfg: ModelConfig, layer: int, earlier: list) -> torch.nn.Module:
        check_plain_dsa(cfg, "FixedSparseMoELLM")
        selector = AdaptiveKSelector(cfg.sparse_top_k, "ratio", ratio=self.fraction)
        cls = _layer_class(cfg, DeepSeekSparseAttention, SparseLatentAttention)
        return cls(cfg, build_indexer(cfg), selector, build_backend(cfg))
