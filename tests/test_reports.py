"""Report text helpers: the significance family (Holm across every variant and length of one question)."""
import pytest

from dsa_lab.experiments import reports
from dsa_lab.common.results_io import mean_ci95, paired_t_pvalue


def _holm_by_hand(pvalues: dict) -> dict:
    """Holm over the whole family, written out: the i-th smallest p (0-based) adjusted to
    min(1, max over j <= i of (m - j) * p_(j))."""
    order = sorted(pvalues, key=pvalues.get)
    m = len(order)
    return {key: min(1.0, max((m - j) * pvalues[order[j]] for j in range(rank + 1))) for rank, key in enumerate(order)}


def test_holm_family_corrects_across_every_variant_and_length_of_the_question():
    """Variants at two lengths (one missing at a length, one with a single seed): the family is every testable
    (variant, L), each raw p the paired t-test of its per-seed deltas, each p_holm Holm over all of them."""
    deltas = {("a", 32): [-0.10, -0.12, -0.05], ("b", 32): [0.1, -0.1, 0.0], ("d", 32): [-0.3],
              ("a", 64): [-0.20, -0.21, -0.17], ("b", 64): [0.02, 0.05, 0.04], ("c", 64): [0.2, -0.1, 0.1]}
    summary = {"baseline": {"32": {}, "64": {}}}
    for (name, L), d in deltas.items():
        summary.setdefault(name, {})[str(L)] = {"delta_val_loss_vs_baseline": mean_ci95(d)}
    family = reports.holm_family(summary, ["baseline", "a", "b", "c", "d"], [32, 64])
    raw = {key: paired_t_pvalue(d) for key, d in deltas.items() if len(d) > 1}
    assert set(family) == set(raw) and len(raw) == 5  # d has one seed: untestable, not in the family
    assert {key: v["p"] for key, v in family.items()} == pytest.approx(raw, rel=1e-9)
    expected = _holm_by_hand(raw)
    assert {key: v["p_holm"] for key, v in family.items()} == pytest.approx(expected, rel=1e-9)
    assert raw[("a", 32)] < 0.05 < family[("a", 32)]["p_holm"] and family[("a", 64)]["p_holm"] < 0.05
