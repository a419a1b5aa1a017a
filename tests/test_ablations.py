"""Indexer-optimisation experiment and comprehensive ablations end to end on real text (tiny sizes)."""
import json

import pytest

import reports
import run_comprehensive_ablations
import run_experiment
import variants

TINY = dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, batch_size=4, eval_every=4, eval_windows=8,
            profile_steps=1, dense_steps=6, warmup_steps=3, steps=4)


@pytest.fixture(scope="module")
def optimization(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("opt")
    run_experiment.CONFIG.update(TINY, cache_dir=str(tmp_path_factory.mktemp("cache")))
    argv = ["--experiment", "indexer_optimization", "--preset", "quick", "--seq-lens", "32", "--seeds", "1", "2",
            "--device", "cpu", "--out", str(out), "--optimization", "light", "int8_indexer", "local_global"]
    assert run_experiment.main(argv) == 0
    yield out
    run_experiment.CONFIG.clear()


def test_indexer_optimization_writes_summary_figures_and_report(optimization):
    s = json.loads((optimization / "summary.json").read_text())
    assert s["experiment"] == "indexer_optimization" and s["strategies"] == ["baseline", "light", "int8_indexer",
                                                                             "local_global"]
    light = s["results"]["light"]["32"]
    for m in ("val_loss", "val_accuracy", "val_perplexity", "train_loss_variance", "avg_time_per_step", "indexer_ms",
              "peak_memory_mb", "indexer_flops_per_token", "attention_flops_per_token", "params", "indexer_params",
              "indexer_overhead", "indexer_recall", "speedup_vs_baseline"):
        assert set(light[m]) == {"mean", "ci95", "per_seed"} and len(light[m]["per_seed"]) == 2, m
    assert light["indexer_params"]["mean"] < s["results"]["baseline"]["32"]["indexer_params"]["mean"]
    assert s["results"]["baseline"]["32"]["speedup_vs_baseline"]["mean"] == pytest.approx(1.0)
    for png in ("optimization_comparison.png", "speed_quality_tradeoffs.png", "scaling_analysis.png"):
        assert (optimization / png).stat().st_size > 10_000
    assert "Pareto front" in (optimization / "REPORT.md").read_text()


def test_ablation_records_are_resumed_not_redone(tmp_path, monkeypatch, corpus, capsys):
    mode = {"preset": "quick", "seq_lens": [32], "seeds": [1],
            "overrides": {**TINY, "cache_dir": str(tmp_path / "cache")}, "subset": True}
    monkeypatch.setitem(run_comprehensive_ablations.MODES, "quick", mode)
    monkeypatch.setitem(variants.QUICK_SUBSET, "quantization", ["int4_minimal"])
    argv = ["--mode", "quick", "--questions", "quantization", "--out", str(tmp_path / "abl"), "--device", "cpu"]
    assert run_comprehensive_ablations.main(argv) == 0
    record = json.loads((tmp_path / "abl" / "records" / "int4_minimal__L32__seed1.json").read_text())
    assert {"ablation_name", "ablation_config", "sequence_length", "seed", "metrics"} <= set(record)
    assert record["ablation_config"]["indexer_precision"] == "int4"
    report = (tmp_path / "abl" / "REPORT.md").read_text()
    assert "## quantization" in report and "lowest validation loss" in report and "untestable (1 seed)" in report
    stamp = (tmp_path / "abl" / "records" / "int4_minimal__L32__seed1.json").stat().st_mtime_ns
    assert run_comprehensive_ablations.main(argv) == 0  # resumed: the record is read back, not rewritten
    assert (tmp_path / "abl" / "records" / "int4_minimal__L32__seed1.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "abl" / "pareto_quantization.png").exists()


def test_catalogues_match_the_research_plan_and_are_valid_configs():
    from config import ModelConfig
    assert len(variants.CATEGORIES["indexer_architecture"]) == 15  # the 4 x 4 grid less h4_d64 (= the baseline)
    assert len(variants.CATEGORIES["attention_patterns"]) == 13
    assert len(variants.CATEGORIES["quantization"]) == 12
    assert len(variants.CATEGORIES["combinations"]) == 20
    for category in variants.CATEGORIES.values():
        for overrides in category.values():
            ModelConfig(**overrides).validate()
    for name in variants.OPTIMIZATIONS:
        ModelConfig(**variants.OPTIMIZATIONS[name]).validate()


def test_pareto_front_and_significance():
    pts = {"a": (1.0, 3.0), "b": (2.0, 2.0), "c": (3.0, 2.5), "d": (0.5, 4.0)}
    assert reports.pareto_front(pts) == ["d", "a", "b"]
    ci = lambda lo, hi: {"delta_val_loss_vs_baseline": {"mean": (lo + hi) / 2, "ci95": [lo, hi], "per_seed": []}}
    assert reports.significance(ci(-0.2, -0.1)) == "better"
    assert reports.significance(ci(0.1, 0.2)) == "worse"
    assert reports.significance(ci(-0.1, 0.1)) == "n.s."


def test_unknown_strategy_is_a_one_line_error(capsys, tmp_path):
    code = run_experiment.main(["--experiment", "indexer_optimization", "--optimization", "turbo", "--out",
                                str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown --optimization ['turbo']" in err and "\n" not in err
