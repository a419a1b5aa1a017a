"""The warm-up stopping rule: stops on a flat KL, not on a falling one; the cap and fixed counts say so."""
import pytest

from dsa_lab.common.plateau import STOP_CAP, STOP_FIXED, STOP_PLATEAU, PlateauRule, PlateauTracker


def feed(tracker, kls):
    for i, kl in enumerate(kls, 1):
        if tracker.update(i * tracker.rule.eval_every, kl):
            return i * tracker.rule.eval_every
    return None


def test_falling_kl_runs_to_the_cap():
    tracker = PlateauTracker(PlateauRule(max_steps=100, eval_every=10, window=3, min_rel_improvement=0.02))
    assert feed(tracker, [3.0 * 0.9 ** i for i in range(10)]) == 100
    assert tracker.stop_reason == STOP_CAP and tracker.record()["steps_used"] == 100


def test_flat_kl_stops_after_the_window():
    tracker = PlateauTracker(PlateauRule(max_steps=1000, eval_every=10, window=3, min_rel_improvement=0.02))
    # falls to 1.0 at the 4th evaluation, then moves by < 2 %: the rule fires 3 evaluations later
    assert feed(tracker, [3.0, 2.0, 1.5, 1.0, 0.995, 0.99, 0.992, 0.5]) == 70
    assert tracker.stop_reason == STOP_PLATEAU
    assert tracker.record()["held_out_kl"] == [3.0, 2.0, 1.5, 1.0, 0.995, 0.99, 0.992]


def test_slow_but_real_improvement_keeps_going():
    tracker = PlateauTracker(PlateauRule(max_steps=1000, eval_every=10, window=2, min_rel_improvement=0.01))
    assert feed(tracker, [1.0, 0.98, 0.96, 0.94, 0.92]) is None  # 2 % per window > 1 %


def test_fixed_count_ignores_the_plateau():
    tracker = PlateauTracker(PlateauRule(max_steps=50, eval_every=10, enabled=False))
    assert feed(tracker, [1.0] * 5) == 50 and tracker.stop_reason == STOP_FIXED


@pytest.mark.parametrize("kwargs", [dict(max_steps=-1), dict(max_steps=10, eval_every=0),
                                    dict(max_steps=10, min_rel_improvement=1.0)])
def test_bad_rule_is_refused(kwargs):
    with pytest.raises(ValueError):
        PlateauRule(**kwargs)


def test_non_finite_kl_is_refused():
    with pytest.raises(ValueError, match="held-out KL is nan"):
        PlateauTracker(PlateauRule(max_steps=10)).update(5, float("nan"))
