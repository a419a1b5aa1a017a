"""The variant registry: every named indexer variant, as ModelConfig overrides, in one place.

The runners (`run_experiment.py --experiment indexer_optimization`, `run_comprehensive_ablations.py`), the
tests and the README read these tables; no other module defines a variant name. Data only (layer 1).

A family table maps a variant name to the overrides that define it (applied to whatever model config a
test or run starts from). The runners train every variant on the 4 x 64 baseline indexer:
`on_baseline(family)` adds those overrides underneath.
"""
from __future__ import annotations

from config import INDEXER_PRECISIONS, K_STRATEGIES, SELECTION_PATTERNS


def indexer_size(heads: int, dim: int) -> dict:
    """Overrides for a `heads` x `dim` indexer with RoPE on half its dims (kept even)."""
    return {"indexer_heads": heads, "indexer_dim": dim, "indexer_rope_dim": dim // 4 * 2}


# ----------------------------------------------------------------------------- families
# the plan's four named indexer sizes
SIZES: dict[str, dict] = {"baseline": indexer_size(4, 64), "light": indexer_size(2, 32),
                          "minimal": indexer_size(1, 16), "ultra_light": indexer_size(1, 8)}
BASELINE = SIZES["baseline"]
# the heads x dims grid, less h4_d64: that point is the baseline itself (a second name would be a wasted run
# per length and seed, trained beside an identical one)
ARCHITECTURES: dict[str, dict] = {f"h{h}_d{d}": indexer_size(h, d) for h in (1, 2, 3, 4) for d in (8, 16, 32, 64)
                                  if (h, d) != (4, 64)}
# the plan's 13 candidate patterns (efficient_patterns.py)
PATTERNS: dict[str, dict] = {p: {"selection_pattern": p} for p in SELECTION_PATTERNS if p != "topk"}
# simulated low-precision index scores (quantization_utils.py)
PRECISIONS: dict[str, dict] = {p: {"indexer_precision": p} for p in INDEXER_PRECISIONS if p != "fp32"}
# the plan's 12 quantisation variants: precision x named size
QUANTIZATION: dict[str, dict] = {f"{p}_{size}": {**SIZES[size], **PRECISIONS[p]}
                                 for p in ("fp16", "mixed", "int8", "int4")
                                 for size in ("baseline", "light", "minimal")}
# adaptive k: fixed ratios, progressive schedules, entropy/position/dynamic rules, and the budget-matched
# *_matched versions of the three rules (mean keys rescaled to fixed top-k's) (adaptive_selection.py)
K_SELECTION: dict[str, dict] = {s: {"k_strategy": s} for s in K_STRATEGIES if s != "fixed"}
# cross-layer sharing: groups of n consecutive layers use the first layer's index scores
SHARED: dict[str, dict] = {f"shared_{n}": {"shared_indexer_group": n} for n in (2, 4)}
# two-scale indexer: blocks of n tokens scored first, tokens scored inside the best blocks
MULTISCALE: dict[str, dict] = {f"multiscale_{n}": {"multiscale_block": n} for n in (8, 16)}


def _combinations() -> dict[str, dict]:
    """The plan's 20 combinations: size x precision x (plain | local+global | adaptive k), and a few more."""
    combos = {}
    extras = {"topk": {}, "local_global": PATTERNS["local_global_25"], "adaptive_k": K_SELECTION["adaptive_entropy"]}
    for size in ("light", "minimal"):
        for precision in ("fp16", "int8"):
            for extra in ("topk", "local_global", "adaptive_k"):
                combos[f"{size}+{precision}+{extra}"] = {**SIZES[size], **PRECISIONS[precision], **extras[extra]}
    for precision in ("fp16", "int8"):
        for extra in ("topk", "local_global"):
            combos[f"ultra_light+{precision}+{extra}"] = {**SIZES["ultra_light"], **PRECISIONS[precision],
                                                          **extras[extra]}
    combos["light+shared2"] = {**SIZES["light"], **SHARED["shared_2"]}
    combos["minimal+fp16+shared2"] = {**SIZES["minimal"], **PRECISIONS["fp16"], **SHARED["shared_2"]}
    combos["light+multiscale16"] = {**SIZES["light"], **MULTISCALE["multiscale_16"]}
    combos["minimal+int8+multiscale16"] = {**SIZES["minimal"], **PRECISIONS["int8"], **MULTISCALE["multiscale_16"]}
    return combos


COMBINATIONS: dict[str, dict] = _combinations()


def on_baseline(family: dict[str, dict]) -> dict[str, dict]:
    """{name: baseline indexer overrides updated with the variant's own}."""
    return {name: {**BASELINE, **overrides} for name, overrides in family.items()}


# ----------------------------------------------------------------------------- what the runners run
# run_experiment.py --experiment indexer_optimization: one strategy per idea, on the baseline indexer. These
# CLI names (they also name the result files) are kept; each stands for the family variant it points at.
OPTIMIZATIONS: dict[str, dict] = on_baseline({
    **SIZES,
    "local_global": PATTERNS["local_global_25"],
    "sliding_window": PATTERNS["sliding_s50"],
    "hierarchical": PATTERNS["hierarchical_3"],
    "strided": PATTERNS["strided_4"],
    "fp16_indexer": PRECISIONS["fp16"],
    "bf16_indexer": PRECISIONS["bf16"],
    "mixed_precision": PRECISIONS["mixed"],
    "fp8_indexer": PRECISIONS["fp8"],
    "int8_indexer": PRECISIONS["int8"],
    "int4_indexer": PRECISIONS["int4"],
    "adaptive_k": K_SELECTION["adaptive_entropy"],
    "progressive_k": K_SELECTION["progressive_linear"],
    "shared_indexer": SHARED["shared_2"],
    "multiscale_indexer": MULTISCALE["multiscale_16"],
})
# The seed's "Experiment 4" category names (its quick start: --optimization reduced_complexity
# efficient_patterns quantization adaptive_k); each stands for its OPTIMIZATIONS members. A category name
# wins over a strategy of the same name: `adaptive_k` the category includes `adaptive_k` the strategy.
OPTIMIZATION_CATEGORIES: dict[str, list[str]] = {
    "reduced_complexity": ["light", "minimal", "ultra_light", "shared_indexer", "multiscale_indexer"],
    "efficient_patterns": ["local_global", "sliding_window", "hierarchical", "strided"],
    "quantization": ["fp16_indexer", "bf16_indexer", "mixed_precision", "fp8_indexer", "int8_indexer",
                     "int4_indexer"],
    "adaptive_k": ["adaptive_k", "progressive_k"],
}


def expand_optimizations(names: list[str]) -> list[str]:
    """--optimization names (strategies or category names) -> strategies, in order, each once.
    Raises ValueError naming the unknown ones and the choices."""
    unknown = [n for n in names if n not in OPTIMIZATION_CATEGORIES and n not in OPTIMIZATIONS]
    if unknown:
        raise ValueError(f"unknown --optimization {unknown}; choose a category ({', '.join(OPTIMIZATION_CATEGORIES)}) "
                         f"or a strategy ({', '.join(OPTIMIZATIONS)})")
    out: list[str] = []
    for n in names:
        for strategy in OPTIMIZATION_CATEGORIES.get(n, [n]):
            if strategy not in out:
                out.append(strategy)
    return out


def optimization_help() -> str:
    """The --optimization help text: the categories with their members, and the strategies."""
    cats = "; ".join(f"{c} = {' '.join(m)}" for c, m in OPTIMIZATION_CATEGORIES.items())
    return (f"strategies or category names (default: {' '.join(DEFAULT_OPTIMIZATIONS)}). Categories: {cats}. "
            f"Strategies: {', '.join(OPTIMIZATIONS)}")


DEFAULT_OPTIMIZATIONS = ["baseline", "light", "minimal", "ultra_light", "local_global", "fp16_indexer",
                         "fp8_indexer", "int8_indexer", "adaptive_k"]

# run_comprehensive_ablations.py: its categories, the research question each answers, and --mode quick's subset
CATEGORIES: dict[str, dict[str, dict]] = {
    "indexer_architecture": on_baseline(ARCHITECTURES),
    "attention_patterns": on_baseline(PATTERNS),
    "quantization": on_baseline(QUANTIZATION),
    "selection_strategies": on_baseline(K_SELECTION),
    "combinations": on_baseline(COMBINATIONS),
}
QUESTIONS = {"optimal_indexer_config": "indexer_architecture", "attention_patterns": "attention_patterns",
             "quantization": "quantization", "k_values": "selection_strategies", "combinations": "combinations"}
QUICK_SUBSET = {  # one or two per family, for --mode quick
    "indexer_architecture": ["h1_d8", "h1_d16", "h2_d32"],
    "attention_patterns": ["local_global_25", "sliding_s50", "hierarchical_3", "strided_4"],
    "quantization": ["fp16_baseline", "int8_baseline", "int4_baseline"],
    "selection_strategies": ["ratio_25", "progressive_linear", "adaptive_entropy", "adaptive_entropy_matched"],
    "combinations": ["light+fp16+topk", "minimal+int8+local_global"],
}
