"""long_context's figure shows what was run: only the panels of the tasks run, no empty panel, CI wording by seeds."""
import matplotlib.pyplot as plt
import pytest

from dsa_lab.experiments import plots


def _stat(mean, seeds):
    return {"mean": mean, "ci95": [mean - 0.1, mean + 0.1] if len(seeds) > 1 else [None, None],
            "per_seed": [mean] * len(seeds)}


def _summary(tasks, seeds, models=("dense", "dsa")):
    results = {}
    for task in tasks:
        results[task] = {}
        for L in (256, 512):
            entry = {"top_k": 64, "kept_pair_fraction": 0.4}
            for name in models:
                m = {"delta_val_loss_vs_dense": _stat(0.01, seeds), "accuracy": _stat(0.9, seeds),
                     "avg_time_per_step": _stat(0.2, seeds)}
                if name != "dense":
                    m.update(recall_by_distance=[0.9, 0.7, 0.5], oracle_recall_by_distance=[0.95, 0.8, 0.6])
                entry[name] = m
            results[task][str(L)] = entry
    return {"results": results, "seeds": {t: seeds for t in tasks}}


@pytest.mark.parametrize("tasks, seeds, titles", [
    (["mqar"], [42], ["mqar: k = 64, one seed (no CI)", "mqar: time per step (same run)", "mqar L=512: recall by distance"]),
    (["lm"], [42, 43], ["lm: k = 64, mean ± 95% CI over seeds", "lm: time per step (same run)",
                        "lm L=512: recall by distance"]),
    (["lm", "mqar"], [42, 43], ["lm: k = 64, mean ± 95% CI over seeds", "mqar: k = 64, mean ± 95% CI over seeds",
                                "lm: time per step (same run)", "lm L=512: recall by distance"]),
])
def test_the_figure_has_only_the_panels_of_what_was_run(tasks, seeds, titles):
    fig = plots.long_context_figure(_summary(tasks, seeds), ["dense", "dsa"])
    try:
        assert [ax.get_title() for ax in fig.axes] == titles  # no panel for a task not run, none left empty
        assert all(ax.get_visible() and ax.lines for ax in fig.axes)
    finally:
        plt.close(fig)


def test_no_recall_panel_when_no_model_selects():
    fig = plots.long_context_figure(_summary(["lm"], [42], models=("dense",)), ["dense"])
    try:
        assert [ax.get_title() for ax in fig.axes] == ["lm: k = 64, one seed (no CI)", "lm: time per step (same run)"]
    finally:
        plt.close(fig)


def test_the_written_figure_is_a_png(tmp_path):
    plots.long_context(_summary(["mqar"], [42]), ["dense", "dsa"], tmp_path / "long_context.png")
    assert (tmp_path / "long_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_names_only_the_figures_written():
    from dsa_lab.experiments.skeleton import significance
    from dsa_lab.experiments.reports import long_context_report
    for tasks, mqar_figure in ((["lm"], False), (["lm", "mqar"], True)):
        summary = _summary(tasks, [42])
        for by_L in summary["results"].values():
            for entry in by_L.values():
                for m in entry.values():
                    if isinstance(m, dict):
                        m.update(val_loss=m["accuracy"], delta_accuracy_vs_dense=m["delta_val_loss_vs_dense"],
                                 val_accuracy=m["accuracy"], tokens_per_s=m["avg_time_per_step"])
                        m["time_ratio_vs_dense"] = _stat(1.0, [42])
        sig = {t: significance([{"L": int(L), "model": "dsa", "vs": "dense", "metric": "val_loss",
                                 "lower_is_better": True, "differences": [0.01]} for L in summary["results"][t]])
               for t in tasks}  # one seed: untestable, as the runner records it
        text = long_context_report({**summary, "seeds": {t: [42] for t in tasks}, "significance": sig},
                                   ["dense", "dsa"])
        assert ("mqar_accuracy_by_distance.png" in text) == mqar_figure


def _with_warmups(summary, reasons):
    """DSA warm-up records (held-out KL curves) per L and seed; `reasons`: the stop reason per seed. Every
    (task, L, seed) gets its own curve (its own KL values; odd seeds stop a step earlier)."""
    for t, by_L in enumerate(summary["results"].values()):
        for L, entry in by_L.items():
            entry["dsa"]["warmup_plateau"] = {
                str(s): {"steps": [20, 40, 60][:3 - s % 2], "held_out_kl": [(1.0 + t + s / 100) / (int(L) / 256) ** i
                                                                         for i in range(3 - s % 2)],
                         "steps_used": 60 - 20 * (s % 2), "stop_reason": r, "rule": "the rule"}
                for s, r in reasons.items()}
    return summary


def test_the_warmup_figure_draws_every_seeds_curve_and_where_it_stopped(tmp_path):
    """One panel per task; in it one line per (L, seed) with that record's KL curve, one colour per L, and at the
    curve's last point a cross (plateau) or a square (step cap) in the curve's colour."""
    reasons = {42: "plateau", 43: "step_cap"}
    summary = _with_warmups(_summary(["lm", "mqar"], [42, 43]), reasons)
    fig = plots.warmup_curves_figure(summary)
    try:
        assert [ax.get_title() for ax in fig.axes] == [f"{task}: DSA indexer warm-up (x: plateau, square: step cap)"
                                                       for task in ("lm", "mqar")]
        for ax, task in zip(fig.axes, ("lm", "mqar")):
            curves = [line for line in ax.lines if line.get_linestyle() == "-"]
            marks = [line for line in ax.lines if line.get_linestyle() == "None"]
            assert len(curves) == len(marks) == 2 * len(reasons) == len(ax.lines) // 2
            expected = {(L, seed): rec for L, entry in summary["results"][task].items()
                        for seed, rec in entry["dsa"]["warmup_plateau"].items()}
            drawn = {(tuple(c.get_xdata()), tuple(c.get_ydata())): (c, m) for c, m in zip(curves, marks)}
            colours = {}  # L -> the colours its curves are drawn in
            for (L, seed), rec in expected.items():
                curve, mark = drawn.pop((tuple(rec["steps"]), tuple(rec["held_out_kl"])))  # KeyError: not drawn
                assert list(mark.get_xdata()) == rec["steps"][-1:] and list(mark.get_ydata()) == rec["held_out_kl"][-1:]
                assert mark.get_marker() == {"plateau": "x", "step_cap": "s"}[rec["stop_reason"]], (task, L, seed)
                assert tuple(mark.get_color()) == tuple(curve.get_color()), (task, L, seed)
                colours.setdefault(L, set()).add(tuple(curve.get_color()))
            assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == len(colours)
            assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["L=256", "L=512"]
    finally:
        plt.close(fig)
    assert plots.warmup_curves(summary, tmp_path / "warmup_kl.png")
    assert (tmp_path / "warmup_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.warmup_curves_figure(_summary(["lm"], [42])) is None  # no warm-up: no figure
    assert not plots.warmup_curves(_summary(["lm"], [42]), tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_the_report_names_the_warmup_figure_only_when_a_warmup_ran():
    from dsa_lab.experiments.reports import long_context_report
    from dsa_lab.experiments.skeleton import significance
    for warm in (False, True):
        summary = _summary(["lm"], [42])
        for entry in summary["results"]["lm"].values():
            for m in (entry["dense"], entry["dsa"]):
                m.update(val_loss=m["accuracy"], val_accuracy=m["accuracy"], tokens_per_s=m["avg_time_per_step"],
                         time_ratio_vs_dense=_stat(1.0, [42]))
        if warm:
            _with_warmups(summary, {42: "plateau"})
        sig = {"lm": significance([{"L": int(L), "model": "dsa", "vs": "dense", "metric": "val_loss",
                                    "lower_is_better": True, "differences": [0.01]} for L in summary["results"]["lm"]])}
        text = long_context_report({**summary, "significance": sig}, ["dense", "dsa"])
        assert ("warmup_kl.png" in text) == warm


def test_findings_against_dense_are_not_confused_with_dsa_against_the_oracle():
    """dsa has two tests per L (vs dense, vs oracle): each finding and the decomposition read their own."""
    from dsa_lab.experiments.reports import long_context_decomposition, long_context_findings
    summary = _summary(["mqar"], [42, 43], models=("dense", "dsa", "oracle"))
    for entry in summary["results"]["mqar"].values():
        entry["dsa"]["delta_accuracy_vs_dense"] = _stat(-0.30, [42, 43])
        entry["dsa"]["delta_accuracy_vs_oracle"] = _stat(-0.20, [42, 43])
        entry["oracle"]["delta_accuracy_vs_dense"] = _stat(-0.10, [42, 43])
        for m in entry.values():
            if isinstance(m, dict):
                m["time_ratio_vs_dense"] = _stat(1.0, [42, 43])
    tests = [{"L": L, "model": model, "vs": vs, "metric": "accuracy", "verdict": "worse" if vs == "oracle" else "ns",
              "p": p, "p_holm": p} for L in (256, 512) for model, vs, p in
             (("dsa", "dense", 0.5), ("oracle", "dense", 0.6), ("dsa", "oracle", 0.01))]
    summary["significance"] = {"mqar": {"tests": tests, "n_tests": len(tests), "alpha": 0.05}}
    text = "\n".join(long_context_findings(summary, ["dense", "dsa", "oracle"]))
    assert "mqar, dsa: no significant difference from dense at any L" in text and "p_Holm 0.5" in text
    assert "p_Holm 0.01" not in text  # the vs-oracle test does not stand in for the vs-dense one
    table = long_context_decomposition(summary)
    assert "| mqar | 512 | dsa | accuracy | -0.100 ± 0.100 (p_Holm 0.6) | -0.200 ± 0.100 (p_Holm 0.01) | " \
           "-0.300 ± 0.100 (p_Holm 0.5) |" in table
