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
from dsa_lab.common.variants import ARCHITECTURES, MULTISCALE, SHARED, SIZES

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
    indexer = MultiScaleIndexer(32, 2, 16, block_size=block, max_seq_len=64)
    x = torch.randn(2, L, 32)
    scores, coarse = indexer.scores_and_coarse(x)
    assert torch.equal(scores, indexer(x))  # the fine scores are the indexer's usual output
    selector = RegionRestrictedSelector(TopKTokenSelector(6), block, top_blocks=3)
    assert selector.regions_for(L) == 2  # derived from k and L: budget min(2k, k + (L-k)//2) = 12 tokens -> 2 + own
    regions = selector.region_mask(coarse)  # (B, L, L)
    t = torch.arange(L)
    assert not (regions & (t[None, :] > t[:, None])).any()
    own_block = (t[None, :] // block == t[:, None] // block) & (t[None, :] <= t[:, None])
    assert regions[:, own_block].all()
    blocks = regions[:, :, : (L // block) * block].view(2, L, L // block, block)
    past = torch.arange(L // block)[None, :] < (t // block)[:, None]  # (L, blocks) before the own block
    assert (blocks.all(-1) | ~blocks.any(-1))[:, past].all()  # whole past blocks or nothing
    assert (regions.sum(-1) <= 3 * block).all()  # 2 chosen blocks + the own one
    selected_idx, valid = selector(scores, coarse)
    assert_selection_contract(selected_idx, valid, budget=6)
    assert not (selection_mask(selected_idx, valid, L) & ~regions).any()
    changed = x.clone()
    changed[:, 20:] = torch.randn(2, L - 20, 32)
    assert torch.equal(selector.region_mask(indexer.scores_and_coarse(changed)[1])[:, :20], regions[:, :20])
    with pytest.raises(ValueError, match="coarse scores"):
        selector(scores)  # no coarse scores: refused, never a selection from stale ones


def test_multiscale_regions_are_the_best_pooled_blocks():
    """The regions are the past blocks whose mean-pooled key scores highest, recomputed here by loops."""
    torch.manual_seed(1)
    L, block, top_blocks = 24, 4, 2
    indexer = MultiScaleIndexer(16, 2, 8, block_size=block, max_seq_len=32)
    x = torch.randn(1, L, 16)
    with torch.no_grad():
        q, k, w = indexer.project(x)
    _, coarse = indexer.scores_and_coarse(x)
    selector = RegionRestrictedSelector(TopKTokenSelector(6), block, top_blocks)
    assert selector.regions_for(L) == 2  # k = 6 at L = 24: budget 12 tokens -> 2 blocks + the own one
    regions = selector.region_mask(coarse)[0]
    for t in range(L):
        complete = list(range((t + 1) // block))  # blocks j with (j+1)*block <= t+1
        score = {j: sum(float(w[0, t, h]) * max(0.0, float(q[0, t, h] @ k[0, j * block:(j + 1) * block].mean(0)))
                        for h in range(2)) for j in complete}
        best = sorted(complete, key=lambda j: -score[j])[:top_blocks]
        expected = {s for s in range(t + 1) if s // block in best or s // block == t // block}
        assert set(regions[t].nonzero()[:, 0].tolist()) == expected, t


def test_multiscale_layers_select_inside_the_regions_of_their_own_forward():
    """Model level: each layer (and a follower sharing its leader's indexer) selects with the coarse scores of
    the leader's indexer on that forward's input, not with any other."""
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(tiny_model_config(n_layers=2, multiscale_block=4, shared_indexer_group=2,
                                                    sparse_top_k=6))
    ids = torch.randint(0, 64, (2, 32))
    _, aux = model(ids, AttentionMode(sparse=True, stats=True), return_aux=True)
    block0 = model.blocks[0]
    x0 = block0.attn_norm(model.token_emb(ids)).detach()
    scores, coarse = block0.attn.indexer.scores_and_coarse(x0)
    assert torch.equal(aux.layers[0].coarse_scores, coarse) and torch.equal(aux.layers[1].coarse_scores, coarse)
    expected, _ = block0.attn.selector(scores, coarse)
    for layer in aux.layers:
        assert torch.equal(layer.selected_idx, expected)
    restricted = selection_mask(*block0.attn.selector(scores, coarse), 32)
    other = selection_mask(*block0.attn.selector(scores, coarse.flip(0)), 32)  # the other sequence's regions
    assert not torch.equal(restricted, other)


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
