"""Adaptive k: bounds, schedules, entropy rules, selector contract, model causality, progress hook."""
import dataclasses
import math

import pytest
import torch

from adaptive_selection import AdaptiveKSelector, build_k_selector, normalised_entropy, top_k_per_row
from config import K_STRATEGIES, ModelConfig
from conftest import tiny_model_config
from models import SparseAttentionMoELLM
from selection_checks import assert_indexer_trains, assert_model_causal, assert_selection_contract
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from sparse_attention import future_mask, selection_mask
from dsa_lab.common.variants import K_SELECTION as SELECTION_VARIANTS

L = 40


def _scores(B=3, seed=0):
    torch.manual_seed(seed)
    scores = torch.randn(B, L, L) * torch.rand(B, L, 1) * 4  # rows of varied sharpness
    return scores.masked_fill(future_mask(L, L, scores.device), float("-inf"))


def test_the_plans_selection_variants_are_configurable():
    assert len(SELECTION_VARIANTS) == 15 and set(SELECTION_VARIANTS) == set(K_STRATEGIES) - {"fixed"}
    for overrides in SELECTION_VARIANTS.values():
        dataclasses.replace(ModelConfig(), **overrides).validate()
    with pytest.raises(ValueError, match="k_strategy"):
        build_k_selector("ratio_33", 8)


def _row_k(selector, scores):
    """The k_t (B, L) the selector's rule gives on `scores` with their future positions masked (as forward does)."""
    return selector.row_k(scores.masked_fill(future_mask(L, L, scores.device), float("-inf")))


@pytest.mark.parametrize("name", SELECTION_VARIANTS)
@pytest.mark.parametrize("top_k", [1, 6, 64])
def test_k_within_bounds_and_slots_match(name, top_k):
    selector = build_k_selector(name, top_k)
    selector.set_progress(0.3)
    scores = _scores()
    selected_idx, valid = selector(scores)
    assert_selection_contract(selected_idx, valid)
    row_k = _row_k(selector, scores)
    t = torch.arange(L)
    assert (row_k >= 1).all() and (row_k <= t + 1).all()
    assert torch.equal(valid.sum(-1), row_k)  # exactly k_t valid slots per row
    assert selected_idx.shape[-1] == int(row_k.max())


@pytest.mark.parametrize("name", SELECTION_VARIANTS)
def test_selection_does_not_look_at_future_scores(name):
    scores = _scores()
    noisy = scores.clone()
    future = future_mask(L, L, scores.device).expand_as(noisy)
    noisy[future] = torch.randn(int(future.sum())) * 100
    selector = build_k_selector(name, 8)
    assert torch.equal(selection_mask(*selector(scores), L), selection_mask(*selector(noisy), L))


def test_top_k_per_row_takes_the_best_k_t():
    scores = _scores()
    row_k = torch.randint(1, L + 1, (3, L)).minimum(torch.arange(1, L + 1))
    mask = selection_mask(*top_k_per_row(scores, row_k), L)
    for b, t in ((0, 5), (1, 20), (2, 39)):
        best = scores[b, t].topk(int(row_k[b, t])).indices
        assert mask[b, t, best].all() and int(mask[b, t].sum()) == int(row_k[b, t])


def test_ratio_k_is_a_share_of_the_causal_prefix():
    selector = AdaptiveKSelector(8, "ratio", ratio=0.25)
    scores = _scores()
    expected = torch.ceil(0.25 * torch.arange(1, L + 1) - 1e-6).clamp_min(1).long()
    assert torch.equal(_row_k(selector, scores)[0], expected)
    assert torch.equal(selector(scores)[1].sum(-1)[0], expected)  # what forward selects


@pytest.mark.parametrize("schedule", ["linear", "exponential", "cosine"])
def test_progressive_schedules_grow_from_start_to_top_k(schedule):
    selector = AdaptiveKSelector(32, f"progressive_{schedule}", start_fraction=0.25)
    ks = []
    for p in torch.linspace(0, 1, 11).tolist():
        selector.set_progress(p)
        ks.append(selector.scheduled_k())
    assert ks[0] == 8 and ks[-1] == 32 and ks == sorted(ks)
    with pytest.raises(ValueError):
        selector.set_progress(1.5)


def test_entropy_rules_give_flat_rows_more_tokens():
    flat = torch.zeros(1, L, L).masked_fill(future_mask(L, L, "cpu"), float("-inf"))
    peaked = flat.clone()
    peaked[0, torch.arange(L), torch.arange(L)] = 50.0  # all mass on the current token
    h_flat, h_peaked = normalised_entropy(flat), normalised_entropy(peaked)
    assert torch.allclose(h_flat, torch.ones_like(h_flat), atol=1e-5)
    assert (h_peaked[0, 1:] < 1e-3).all()
    for strategy in ("entropy", "dynamic"):
        selector = AdaptiveKSelector(8, strategy, min_scale=0.5, max_scale=1.5)
        k_flat = selector(flat)[1].sum(-1)  # valid slots per row: the k_t forward used
        k_peaked = selector(peaked)[1].sum(-1)
        t = torch.arange(L)
        assert torch.equal(k_flat[0], torch.clamp(t + 1, max=12))  # ceil(8 * 1.5)
        assert (k_peaked[0, 8:] <= 5).all()  # ~ceil(8 * 0.5), dynamic averages row 0's h = 1 in


def test_position_rule_is_sublinear_and_prefix_consistent():
    selector = AdaptiveKSelector(9, "position")
    t = torch.arange(L)
    expected = torch.minimum(torch.ceil(torch.sqrt(9.0 * (t + 1))).long(), t + 1)
    assert torch.equal(selector(_scores())[1].sum(-1)[0], expected)
    assert int(expected[35]) == math.ceil(math.sqrt(9 * 36))  # k grows as sqrt(k * (t+1)) past k
    assert (expected[9:] > 9).all()  # as the module docstring says: top_k is the crossover, not a cap
    doc = __import__("adaptive_selection").__doc__
    assert "k_t > top_k for every t+1 > top_k" in doc and "sublinear" not in doc


@pytest.mark.parametrize("rule", ["entropy", "position", "dynamic"])
@pytest.mark.parametrize("top_k", [8, 20])
def test_budget_matched_rules_use_fixed_top_ks_mean_keys(rule, top_k):
    """The *_matched variants select, on average, as many keys as fixed top-k (to 1 % for the positional rule,
    within 8 % (rounding at small k) for the data-dependent ones) while the plain rules do not."""
    scores = _scores(B=4)
    fixed = float(torch.arange(1, L + 1).clamp(max=top_k).float().mean())
    matched = build_k_selector(f"adaptive_{rule}_matched", top_k)
    idx, valid = matched(scores)
    assert_selection_contract(idx, valid)
    assert torch.equal(valid.sum(-1), _row_k(matched, scores))
    mean = float(valid.sum(-1).float().mean())
    if rule == "position":
        assert mean == pytest.approx(fixed, rel=0.01)  # up to the rounding of one scale c
        plain = build_k_selector("adaptive_position", top_k)
        assert plain(scores)[1].sum(-1).float().mean() > 1.1 * fixed  # the unmatched rule uses more keys
        # shape kept: k_t still grows with t past the crossover
        k = valid.sum(-1)
        assert (k[0, 1:] >= k[0, :-1]).all()
    else:
        assert mean == pytest.approx(fixed, rel=0.08)


@pytest.mark.parametrize("name", SELECTION_VARIANTS)
def test_every_strategy_keeps_the_model_causal(name):
    assert_model_causal(k_strategy=name)


@pytest.mark.parametrize("name", ["ratio_25", "progressive_cosine", "adaptive_entropy", "adaptive_dynamic"])
def test_indexer_trains_under_adaptive_k(name):
    assert_indexer_trains(k_strategy=name)


def test_training_progress_reaches_every_layer():
    model = SparseAttentionMoELLM(tiny_model_config(k_strategy="progressive_linear", sparse_top_k=16))
    model.set_training_progress(0.0)
    assert all(a.selector.scheduled_k() == 4 for a in model.attentions)
    model.set_training_progress(1.0)
    assert all(a.selector.scheduled_k() == 16 for a in model.attentions)
    _, aux = model(torch.randint(0, 64, (1, 24)), return_aux=True)
    assert all(int((layer.selected_idx >= 0).sum(-1).max()) == 16 for layer in aux.layers)
    with pytest.raises(ValueError, match="fraction"):
        model.set_training_progress(-0.1)


def test_pattern_and_k_strategy_cannot_be_combined():
    with pytest.raises(ValueError, match="selection_pattern.*k_strategy"):
        tiny_model_config(selection_pattern="strided_2", k_strategy="ratio_50").validate()
