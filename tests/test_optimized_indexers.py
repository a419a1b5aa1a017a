"""Indexer sizes, cross-layer sharing, the two-scale indexer, factories, config validation, param counts."""
import dataclasses

import pytest
import torch

from config import ModelConfig
from conftest import indexer_param_count, indexer_parameter_report, tiny_model_config, variant_parameter_reports
from models import SparseAttentionMoELLM
from optimized_indexers import MultiScaleIndexer, OptimizedLightningIndexer, RegionRestrictedSelector
from selection_checks import assert_indexer_trains, assert_model_causal, assert_selection_contract
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from sparse_attention import AttentionMode, LightningIndexer, TopKTokenSelector, selection_mask
from common.variants import ARCHITECTURES, MULTISCALE, SHARED, SIZES

INDEXER_VARIANTS = {**SIZES, **ARCHITECTURES}  # the named sizes and the heads x dims grid


def test_variants_cover_the_plans_sizes_and_grid():
    assert {n: (v["indexer_heads"], v["indexer_dim"]) for n, v in SIZES.items()} == {
        "baseline": (4, 64), "light": (2, 32), "minimal": (1, 16), "ultra_light": (1, 8)}
    grid = {(v["indexer_heads"], v["indexer_dim"]) for v in ARCHITECTURES.values()}
    assert grid | {(4, 64)} == {(h, d) for h in (1, 2, 3, 4) for d in (8, 16, 32, 64)}  # (4, 64): the baseline
    for overrides in {**INDEXER_VARIANTS, **SHARED, **MULTISCALE}.values():
        dataclasses.replace(ModelConfig(), **overrides).validate()


def test_optimized_indexer_is_the_lightning_indexer_in_fp32():
    torch.manual_seed(0)
    optimized = OptimizedLightningIndexer(32, heads=3, dim=16, max_seq_len=64)
    plain = LightningIndexer(32, 3, 16, 8, 64)
    plain.load_state_dict(optimized.state_dict())
    x = torch.randn(2, 20, 32)
    assert torch.equal(optimized(x), plain(x))
    assert torch.isinf(optimized(x)[:, 0, 1:]).all()  # causal mask kept


@pytest.mark.parametrize("name", INDEXER_VARIANTS)
def test_param_count_formula_matches_the_module(name):
    v = INDEXER_VARIANTS[name]
    indexer = OptimizedLightningIndexer(256, v["indexer_heads"], v["indexer_dim"], rope_dim=v["indexer_rope_dim"])
    assert sum(p.numel() for p in indexer.parameters()) == indexer_param_count(256, v["indexer_heads"],
                                                                               v["indexer_dim"])


def test_parameter_reports():
    base = ModelConfig()  # the plan's model: d 256, 4 layers, indexer 4 x 64
    reports = variant_parameter_reports(base, {**INDEXER_VARIANTS, **SHARED})
    assert set(reports) == set(INDEXER_VARIANTS) | set(SHARED)
    baseline = reports["baseline"]
    assert baseline["params_per_indexer"] == indexer_param_count(256, 4, 64) == 83072  # the plan's "~83K"
    assert baseline["indexers"] == 4 and baseline["indexer_params"] == 4 * 83072
    assert baseline["indexer_param_reduction"] == 0
    model = SparseAttentionMoELLM(tiny_model_config())
    assert indexer_parameter_report(model)["total_params"] == sum(p.numel() for p in model.parameters())
    assert 0 < baseline["indexer_share"] < 1
    assert reports["light"]["indexer_params"] == 4 * indexer_param_count(256, 2, 32)
    assert reports["shared_2"]["indexers"] == 2 and reports["shared_4"]["indexers"] == 1
    assert reports["shared_2"]["indexer_param_reduction"] == pytest.approx(0.5)
    shrinking = [reports[n]["indexer_params"] for n in ("baseline", "light", "minimal", "ultra_light")]
    assert shrinking == sorted(shrinking, reverse=True)


@pytest.mark.parametrize("name", INDEXER_VARIANTS)
def test_every_indexer_size_keeps_the_model_causal(name):
    assert_model_causal(backends=("masked",), **INDEXER_VARIANTS[name])  # sizes don't touch the backends


@pytest.mark.parametrize("overrides", [*SHARED.values(), *MULTISCALE.values(),
                                       dict(multiscale_block=4, shared_indexer_group=2, indexer_precision="int8"),
                                       dict(multiscale_block=4, selection_pattern="local_global_25"),
                                       dict(multiscale_block=4, k_strategy="adaptive_entropy")])
def test_shared_and_multiscale_indexers_keep_the_model_causal_and_train(overrides):
    assert_model_causal(**overrides)
    assert_indexer_trains(**overrides)


def test_shared_indexer_is_computed_once_and_trained_by_every_layer():
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(tiny_model_config(n_layers=3, shared_indexer_group=2))
    leader, follower, alone = model.attentions
    assert follower.indexer is None and not any(".indexer." in n for n, _ in follower.named_parameters())
    assert alone.indexer is not None  # a last group of one layer keeps its own
    _, aux = model(torch.randint(0, 64, (2, 24)), AttentionMode(sparse=True, indexer_loss="sparse"), return_aux=True)
    aux.layers[1].indexer_loss.backward()  # the follower's KL alone reaches the leader's indexer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in leader.indexer.parameters())
    with pytest.raises(ValueError, match="shares its group leader's indexer"):
        follower(torch.randn(2, 24, 32))


def test_shared_followers_see_the_leaders_scores():
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(tiny_model_config(n_layers=2, shared_indexer_group=2, sparse_top_k=5))
    _, aux = model(torch.randint(0, 64, (2, 24)), return_aux=True)
    assert torch.equal(aux.layers[0].selected_idx, aux.layers[1].selected_idx)


def test_multiscale_regions_are_causal_and_contain_the_selection():
    torch.manual_seed(0)
    L, block = 40, 4
    indexer = MultiScaleIndexer(32, 2, 16, block_size=block, top_blocks=3, max_seq_len=64)
    x = torch.randn(2, L, 32)
    scores = indexer(x)
    selector = RegionRestrictedSelector(TopKTokenSelector(6), indexer)
    assert indexer.regions_for(6, L) == 2  # derived from k and L: budget min(2k, k + (L-k)//2) = 12 tokens -> 2 + own
    regions = selector.region_mask(L)  # (B, L, L)
    t = torch.arange(L)
    assert not (regions & (t[None, :] > t[:, None])).any()
    own_block = (t[None, :] // block == t[:, None] // block) & (t[None, :] <= t[:, None])
    assert regions[:, own_block].all()
    blocks = regions[:, :, : (L // block) * block].view(2, L, L // block, block)
    past = torch.arange(L // block)[None, :] < (t // block)[:, None]  # (L, blocks) before the own block
    assert (blocks.all(-1) | ~blocks.any(-1))[:, past].all()  # whole past blocks or nothing
    assert (regions.sum(-1) <= 3 * block).all()  # 2 chosen blocks + the own one
    selected_idx, valid = selector(scores)
    assert_selection_contract(selected_idx, valid, budget=6)
    assert not (selection_mask(selected_idx, valid, L) & ~regions).any()
    changed = x.clone()
    changed[:, 20:] = torch.randn(2, L - 20, 32)
    indexer(changed)
    assert torch.equal(selector.region_mask(L)[:, :20], regions[:, :20])  # regions of t < 20 ignore the future


@pytest.mark.parametrize("key,value", [("indexer_precision", "fp12"), ("selection_pattern", "diagonal"),
                                       ("k_strategy", "ratio_33"), ("shared_indexer_group", 0),
                                       ("multiscale_block", 1), ("multiscale_block", -4)])
def test_bad_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        tiny_model_config(**{key: value}).validate()


def test_default_config_builds_the_plain_indexer_and_selector():
    model = SparseAttentionMoELLM(tiny_model_config())
    for attn in model.attentions:
        assert type(attn.indexer) is LightningIndexer and type(attn.selector) is TopKTokenSelector
    assert model.leaders == [0, 1]
