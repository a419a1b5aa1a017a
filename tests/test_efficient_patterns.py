"""Selection patterns: the selector contract, kept windows, budgets, model causality, KL training."""
import dataclasses

import pytest
import torch

from config import SELECTION_PATTERNS, ModelConfig
from efficient_patterns import (PATTERN_BUILDERS, HierarchicalPattern, LocalGlobalPattern, SlidingWindowPattern,
                                StridedPattern, build_pattern)
from conftest import tiny_model_config
from models import SparseAttentionMoELLM
from selection_checks import assert_indexer_trains, assert_model_causal, assert_selection_contract
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from sparse_attention import future_mask, selection_mask
from dsa_lab.common.variants import PATTERNS as PATTERN_VARIANTS


def _scores(B=2, L=40, seed=0):
    torch.manual_seed(seed)
    scores = torch.randn(B, L, L)
    return scores.masked_fill(future_mask(L, L, scores.device), float("-inf"))


def test_the_plans_thirteen_patterns_are_configurable():
    assert len(PATTERN_VARIANTS) == 13 and set(PATTERN_VARIANTS) == set(SELECTION_PATTERNS) - {"topk"}
    for overrides in PATTERN_VARIANTS.values():
        dataclasses.replace(ModelConfig(), **overrides).validate()
    with pytest.raises(ValueError, match="selection_pattern"):
        build_pattern("diagonal", 8)


@pytest.mark.parametrize("name", PATTERN_BUILDERS)
@pytest.mark.parametrize("top_k", [1, 5, 16, 64])
def test_pattern_contract_and_budget(name, top_k):
    scores = _scores()
    selected_idx, valid = build_pattern(name, top_k)(scores)
    assert_selection_contract(selected_idx, valid, budget=top_k)
    count = valid.sum(-1)  # (B, L)
    t = torch.arange(scores.shape[1])
    if not name.startswith("sliding"):  # the levels cover the prefix: exactly min(k, t+1) tokens
        assert torch.equal(count, torch.minimum(t + 1, torch.tensor(top_k)).expand_as(count))


@pytest.mark.parametrize("name", PATTERN_BUILDERS)
def test_pattern_does_not_look_at_future_scores(name):
    """Row t's selection depends only on I[t, :t+1] (garbage in the future half is ignored)."""
    scores = _scores()
    noisy = scores.clone()
    future = future_mask(40, 40, scores.device).expand_as(noisy)
    noisy[future] = torch.randn(int(future.sum())) * 100
    pattern = build_pattern(name, 8)
    a, b = selection_mask(*pattern(scores), 40), selection_mask(*pattern(noisy), 40)
    assert torch.equal(a, b)


def test_local_window_is_always_kept():
    scores = _scores(L=48)
    d = torch.arange(48)[:, None] - torch.arange(48)[None, :]
    for window, global_k in ((1, 4), (6, 3), (12, 0), (20, 20)):
        mask = selection_mask(*LocalGlobalPattern(window, global_k)(scores), 48)
        local = (d >= 0) & (d < window)
        assert mask[:, local].all()
        assert torch.equal(mask.sum(-1), torch.clamp(torch.arange(48) + 1, max=window + global_k).expand(2, 48))


def test_sliding_window_keeps_its_block_and_stays_in_its_window():
    scores = _scores(L=48)
    window, stride, top_k = 16, 4, 8
    mask = selection_mask(*SlidingWindowPattern(window, stride, top_k)(scores), 48)
    t = torch.arange(48)[:, None]
    s = torch.arange(48)[None, :]
    block_start = t // stride * stride
    assert mask[:, (s >= block_start) & (s <= t)].all()  # own block kept
    assert not mask[:, s < block_start + stride - window].any()  # nothing before the window


def test_hierarchical_pattern_fills_every_band():
    scores = _scores(L=64)
    pattern = HierarchicalPattern((2, 8, 24), top_k=14)
    mask = selection_mask(*pattern(scores), 64)
    d = torch.arange(64)[:, None] - torch.arange(64)[None, :]
    assert mask[:, (d >= 0) & (d < 2)].all()
    assert pattern.band_k == [4, 4]  # (14 - 2) split over two bands and the global part
    for (near, far), k in zip(((2, 8), (8, 24)), pattern.band_k):
        band = (d >= near) & (d < far)
        quota = torch.minimum(band.sum(-1), torch.tensor(k))  # (L,) band tokens available, capped
        assert ((mask & band).sum(-1) >= quota).all()  # the global part may add more
    assert torch.equal(mask.sum(-1), torch.clamp(torch.arange(64) + 1, max=14).expand(2, 64))


def test_strided_pattern_keeps_dilated_tokens():
    scores = _scores(L=48)
    mask = selection_mask(*StridedPattern(stride=4, top_k=10, strided_k=3)(scores), 48)
    d = torch.arange(48)[:, None] - torch.arange(48)[None, :]
    assert mask[:, (d >= 0) & (d % 4 == 0) & (d < 12)].all()


@pytest.mark.parametrize("bad", [lambda: LocalGlobalPattern(0, 4), lambda: SlidingWindowPattern(4, 8, 8),
                                 lambda: SlidingWindowPattern(16, 8, 4), lambda: HierarchicalPattern((4, 2), 8),
                                 lambda: HierarchicalPattern((9,), 8), lambda: StridedPattern(2, 4, strided_k=5)])
def test_bad_pattern_arguments_raise(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("name", PATTERN_BUILDERS)
def test_every_pattern_keeps_the_model_causal(name):
    assert_model_causal(selection_pattern=name)


@pytest.mark.parametrize("name", ["local_global_25", "sliding_s50", "hierarchical_4", "strided_4"])
def test_indexer_trains_under_a_pattern(name):
    assert_indexer_trains(selection_pattern=name)


# ----------------------------------------------------------------------------- indexer-free controls
@pytest.mark.parametrize("source", ["local", "random"])
def test_indexer_free_controls_keep_the_contract_and_the_model_causal(source):
    from efficient_patterns import LocalSelector, RandomSelector
    selector = (LocalSelector if source == "local" else RandomSelector)(5)
    idx, valid = selector.select(2, 12, "cpu")
    assert_selection_contract(idx, valid, budget=5)
    assert torch.equal(valid.sum(-1)[0], torch.arange(1, 13).clamp(max=5))  # min(k, t+1) keys per row
    if source == "local":
        assert torch.equal(idx[0, 11].sort().values, torch.arange(7, 12))  # the last k tokens
    else:
        assert not torch.equal(selector.select(2, 12, "cpu")[0], idx)  # redrawn at every call
    assert_model_causal(ks=(4, 64), selection_source=source)
    model = SparseAttentionMoELLM(tiny_model_config(selection_source=source))
    assert model.indexer_parameters() == []


def test_random_control_is_reproducible_per_seed():
    from efficient_patterns import RandomSelector
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(RandomSelector(4).select(1, 10, "cpu")[0])
    assert torch.equal(*draws)
