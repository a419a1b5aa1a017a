"""The variant registry: names are unique, the runners' menus point into it, the README lists what it holds."""
import dataclasses
import re

import pytest
import torch

from dsa_lab.common import variants
from conftest import ROOT
from config import ModelConfig

FAMILIES = {"SIZES": variants.SIZES, "ARCHITECTURES": variants.ARCHITECTURES, "PATTERNS": variants.PATTERNS,
            "PRECISIONS": variants.PRECISIONS, "QUANTIZATION": variants.QUANTIZATION,
            "K_SELECTION": variants.K_SELECTION, "SHARED": variants.SHARED, "MULTISCALE": variants.MULTISCALE,
            "COMBINATIONS": variants.COMBINATIONS}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_variant_is_a_valid_config_with_one_name_in_its_family(family):
    table = FAMILIES[family]
    for overrides in table.values():
        dataclasses.replace(ModelConfig(), **overrides).validate()
    configs = [sorted(o.items()) for o in table.values()]
    assert all(configs.count(c) == 1 for c in configs), f"{family}: two names for one config"


def test_a_name_means_one_config_across_the_registry():
    seen = {}
    for table in [*FAMILIES.values(), *variants.CATEGORIES.values()]:
        for name, overrides in table.items():
            full = {**variants.BASELINE, **overrides}
            assert seen.setdefault(name, full) == full, f"{name!r} names two different configs"


def test_runner_menus_point_into_the_registry():
    on_baseline = [variants.on_baseline(f) for f in FAMILIES.values()]
    for name, overrides in variants.OPTIMIZATIONS.items():  # each strategy is one registry variant on the baseline
        assert any(overrides in f.values() for f in on_baseline), name
    assert set(variants.DEFAULT_OPTIMIZATIONS) <= set(variants.OPTIMIZATIONS)
    assert set(variants.QUESTIONS.values()) == set(variants.CATEGORIES)
    for category, names in variants.QUICK_SUBSET.items():
        assert set(names) <= set(variants.CATEGORIES[category]), category


def test_docs_list_the_registrys_strategies():
    readme = (ROOT / "docs" / "experiments.md").read_text()
    listed = readme.split("`dsa_lab.common.variants.OPTIMIZATIONS`:", 1)[1].split("starts from the same", 1)[0]
    assert set(re.findall(r"`(\w+)`", listed)) == set(variants.OPTIMIZATIONS)
    command = readme.split("--experiment indexer_optimization [--optimization", 1)[1].split("...]", 1)[0]
    assert command.split() == variants.DEFAULT_OPTIMIZATIONS


# ----------------------------------------------------------------------------- variants are what they say
def _runner_lengths_and_k():
    """The comprehensive runner's default lengths, with k = the runners' default top_k_ratio * L."""
    from config import ExperimentConfig
    from run_comprehensive_ablations import MODES
    lengths = sorted({L for mode in MODES.values() for L in mode["seq_lens"]})
    return [(L, max(1, round(ExperimentConfig().top_k_ratio * L))) for L in lengths if L <= 256]


def _selection_sets(L: int, k: int) -> dict[str, torch.Tensor]:
    """Every selection-level catalogue variant (plain top-k baseline, patterns, k strategies, multi-scale)
    applied to the same index scores -> {name: selected mask (B, L, L)}."""
    from models import build_selector
    from optimized_indexers import MultiScaleIndexer
    from sparse_attention import selection_mask
    torch.manual_seed(L)
    x = torch.randn(2, L, 32)
    base = MultiScaleIndexer(32, 4, 64, block_size=8, max_seq_len=L)
    # per-row temperatures: some rows peaked, some flat (entropy-driven k rules see varied rows; a positive
    # row scale changes no order inside a row, so the multi-scale fine scores below stay comparable)
    temperature = torch.exp(torch.empty(2, L, 1).uniform_(-4, 3))
    scores = base(x).detach() * temperature
    sets = {}
    catalogue = {"baseline": {}, **variants.PATTERNS, **variants.K_SELECTION}
    for name, overrides in catalogue.items():
        cfg = dataclasses.replace(ModelConfig(), sparse_top_k=k, max_seq_len=L, **overrides)
        selector = build_selector(cfg, None)
        if hasattr(selector, "set_progress"):
            selector.set_progress(0.3)  # progressive schedules part-way (linear and cosine meet at 0.5)
        sets[name] = selection_mask(*selector(scores), L)
    for name, overrides in variants.MULTISCALE.items():
        indexer = MultiScaleIndexer(32, 4, 64, block_size=overrides["multiscale_block"], max_seq_len=L)
        indexer.load_state_dict(base.state_dict())
        fine, coarse = indexer.scores_and_coarse(x)
        assert torch.equal(fine * temperature, scores)  # same fine scores: only the regions differ
        cfg = dataclasses.replace(ModelConfig(), sparse_top_k=k, max_seq_len=L, **overrides)
        sets[name] = selection_mask(*build_selector(cfg, indexer)(scores, coarse), L)
    return sets


@pytest.mark.parametrize("L,k", _runner_lengths_and_k())
def test_no_two_catalogue_variants_select_the_same_sets_at_the_runners_k_and_L(L, k):
    """Patterns, windows, bands, k rules and multi-scale regions scale with k and L: none is vacuous (equal to
    plain top-k) or a duplicate of another at the runner's default k = L/2."""
    sets = _selection_sets(L, k)
    names = list(sets)
    same = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if torch.equal(sets[a], sets[b])]
    assert not same, f"L={L} k={k}: these variants select identical sets: {same}"


def test_multiscale_configs_that_cover_the_whole_prefix_are_refused():
    from optimized_indexers import check_multiscale, region_blocks
    for L, k in _runner_lengths_and_k():
        for block in (8, 16):
            check_multiscale(k, L, block)  # the catalogue's blocks are fine at the runner's k and L
            assert (region_blocks(k, L, block) + 1) * block < L
    with pytest.raises(ValueError, match="multiscale_block=16.*whole prefix"):
        check_multiscale(16, 32, 16)
    with pytest.raises(ValueError, match="whole prefix"):
        check_multiscale(64, 64, 8)  # k >= L


def test_no_catalogue_variant_is_the_baseline_again():
    for category, table in variants.CATEGORIES.items():
        for name, overrides in table.items():
            assert overrides != variants.BASELINE, f"{category}/{name} is the baseline under another name"


def test_optimization_category_names_expand_to_their_strategies():
    assert set(variants.OPTIMIZATION_CATEGORIES) == {"reduced_complexity", "efficient_patterns", "quantization",
                                                     "adaptive_k"}
    expanded = variants.expand_optimizations(["reduced_complexity", "efficient_patterns", "quantization",
                                              "adaptive_k", "light"])
    assert expanded == [n for c in variants.OPTIMIZATION_CATEGORIES.values() for n in c]  # 'light' not repeated
    assert set(expanded) <= set(variants.OPTIMIZATIONS)
    assert variants.expand_optimizations(["int8_indexer"]) == ["int8_indexer"]
    with pytest.raises(ValueError, match=r"unknown --optimization \['turbo'\]"):
        variants.expand_optimizations(["turbo", "light"])
    for category in variants.OPTIMIZATION_CATEGORIES:
        assert category in variants.optimization_help()


@pytest.mark.parametrize("L,k", _runner_lengths_and_k())
def test_windows_and_bands_restrict_at_the_runners_k_and_L(L, k):
    """A sliding window or a distance band that spans the whole sequence restricts nothing: the window must
    change the selection against the same pattern with an unlimited window, and every band end before L."""
    from efficient_patterns import SlidingWindowPattern, build_pattern
    from sparse_attention import selection_mask
    torch.manual_seed(0)
    scores = torch.randn(2, L, L)
    for name in variants.PATTERNS:
        pattern = build_pattern(name, k)
        if name.startswith("sliding"):
            assert pattern.window_for(L) < L, name
            unlimited = SlidingWindowPattern(L, pattern.stride, k)
            assert not torch.equal(selection_mask(*pattern(scores), L), selection_mask(*unlimited(scores), L)), name
        if name.startswith("hierarchical"):
            scales, _ = pattern.scales_for(L)
            assert scales[-1] < L and len(scales) == int(name.split("_")[1]) - 1, (name, scales)
