"""The variant registry: names are unique, the runners' menus point into it, the README lists what it holds."""
import dataclasses
import re

import pytest

import variants
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


def test_readme_lists_the_registrys_strategies():
    readme = (ROOT / "README.md").read_text()
    listed = readme.split("`variants.OPTIMIZATIONS`:", 1)[1].split("starts from the same", 1)[0]
    assert set(re.findall(r"`(\w+)`", listed)) == set(variants.OPTIMIZATIONS)
    command = readme.split("--experiment indexer_optimization [--optimization", 1)[1].split("...]", 1)[0]
    assert command.split() == variants.DEFAULT_OPTIMIZATIONS
