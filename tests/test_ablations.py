"""Indexer-optimisation experiment and comprehensive ablations end to end on real text (tiny sizes)."""
import json
import math

import pytest
import torch

from dsa_lab.experiments import reports
import run_comprehensive_ablations
import run_experiment
from dsa_lab.common import variants

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
              "indexer_overhead", "indexer_recall", "time_ratio_vs_baseline"):
        assert set(light[m]) == {"mean", "ci95", "per_seed"} and len(light[m]["per_seed"]) == 2, m
    assert light["indexer_params"]["mean"] < s["results"]["baseline"]["32"]["indexer_params"]["mean"]
    assert s["results"]["baseline"]["32"]["time_ratio_vs_baseline"]["mean"] == pytest.approx(1.0)
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
    m = record["metrics"]
    assert 0 < m["quant_topk_overlap"] <= 1 and m["quant_score_rel_error"] > 0  # recorded per run
    assert m["step_peak_memory_mb"] > 0 and m["total_flops_per_token"] > m["attention_flops_per_token"]
    assert record["environment"]["device"] == "cpu" and record["environment"]["torch"] == torch.__version__
    assert "git_commit" in record["environment"] and record["environment"]["world_size"] == 1
    assert record["config"]["model"]["indexer_precision"] == "int4" and record["wall_time_s"] > 0
    base = json.loads((tmp_path / "abl" / "records" / "baseline__L32__seed1.json").read_text())
    assert base["metrics"]["indexer_bytes_per_token"] > m["indexer_bytes_per_token"]  # 4-bit minimal moves less
    report = (tmp_path / "abl" / "REPORT.md").read_text()
    assert "## quantization" in report and "lowest mean validation loss" in report
    assert "No significance test: 1 comparison(s)" in report and "untestable (1 seed)" in report
    assert "keys/query" in report and "step peak MB" in report and "attn MFLOP/tok" in report
    stamp = (tmp_path / "abl" / "records" / "int4_minimal__L32__seed1.json").stat().st_mtime_ns
    assert run_comprehensive_ablations.main(argv) == 0  # resumed: the record is read back, not rewritten
    assert (tmp_path / "abl" / "records" / "int4_minimal__L32__seed1.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "abl" / "pareto_quantization.png").exists()
    capsys.readouterr()
    assert run_comprehensive_ablations.main(argv + ["--steps", "5"]) == 2  # a changed config is refused
    err = capsys.readouterr().err
    assert "made with a different config" in err and "--overwrite" in err
    from dsa_lab.common import results_io  # another machine (device name in the key) is a different config too: never paired
    monkeypatch.setattr(results_io, "device_name", lambda device=None: "other")
    assert run_comprehensive_ablations.main(argv) == 2
    assert "made with a different config" in capsys.readouterr().err
    assert (tmp_path / "abl" / "records" / "int4_minimal__L32__seed1.json").stat().st_mtime_ns == stamp


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


def _record(name, L, seed, loss, time=1.0):
    return {"ablation_name": name, "sequence_length": L, "seed": seed, "category": "c", "ablation_config": {},
            "metrics": {"val_loss": loss, "avg_time_per_step": time}}


def test_aggregate_pairs_by_seed_not_by_position():
    from dsa_lab.experiments import ablations
    records = [_record("baseline", 32, s, loss) for s, loss in ((1, 1.0), (2, 2.0), (3, 3.0))]
    records += [_record("v", 32, s, loss, time) for s, loss, time in ((3, 3.5, 2.0), (1, 1.5, 0.5))]  # no seed 2
    entry = ablations.aggregate(records)["v"]["32"]
    assert entry["delta_val_loss_vs_baseline"]["per_seed"] == [0.5, 0.5]  # seeds 1 and 3, each with its own
    assert entry["time_ratio_vs_baseline"]["per_seed"] == [0.5, 2.0]  # variant time / the same seed's baseline time


def _summary(deltas: dict[str, list[float]], L=64):
    from dsa_lab.common.results_io import mean_ci95
    out = {"baseline": {str(L): {"val_loss": mean_ci95([2.0, 2.0, 2.0])}}}
    for name, d in deltas.items():
        out[name] = {str(L): {"val_loss": mean_ci95([2.0 + x for x in d]), "delta_val_loss_vs_baseline": mean_ci95(d)}}
    return out


def test_holm_family_counts_the_comparisons_and_says_no_significant_difference():
    # 'a' alone would pass an uncorrected test (p = 0.034); with 5 comparisons Holm makes it n.s.
    deltas = {"a": [-0.10, -0.12, -0.05], "b": [0.1, -0.1, 0.0], "c": [0.2, -0.1, 0.1], "d": [0.0, 0.1, -0.2],
              "e": [0.05, -0.05, 0.01]}
    summary = _summary(deltas)
    family = reports.holm_family(summary, ["baseline", *deltas], [64])
    assert len(family) == 5 and family[("a", 64)]["p"] < 0.05 < family[("a", 64)]["p_holm"]
    assert reports.significance(summary["a"]["64"]) == "better"  # the uncorrected CI verdict
    assert reports.significance(summary["a"]["64"], family[("a", 64)]["p_holm"]) == "n.s."
    text = reports.family_verdict(family, 0)
    assert "5 paired t-tests" in text and "Holm" in text and "No significant difference" in text
    strong = _summary({"a": [-0.30, -0.31, -0.29], "b": [0.1, -0.1, 0.0]})
    family = reports.holm_family(strong, ["baseline", "a", "b"], [64])
    assert reports.significance(strong["a"]["64"], family[("a", 64)]["p_holm"]) == "better"
    assert "Significant after correction (1 of 2): a (L=64" in reports.family_verdict(family, 0)


def test_pareto_front_points_with_overlapping_cis_are_marked():
    from dsa_lab.common.results_io import mean_ci95
    summary = {n: {"64": {"val_loss": mean_ci95(loss), "avg_time_per_step": mean_ci95(t)}} for n, loss, t in (
        ("a", [1.0, 1.1, 1.2], [3.0, 3.1, 3.2]), ("b", [1.15, 1.25, 1.35], [2.9, 3.0, 3.1]),  # overlap: a ≈ b
        ("c", [3.0, 3.01, 3.02], [1.0, 1.01, 1.02]))}  # separate
    assert reports.front_text(summary, ["a", "b", "c"], 64, "avg_time_per_step") == "c, b ≈, a ≈"


def test_variant_order_is_interleaved_per_length_and_seed():
    from dsa_lab.experiments import ablations
    names = ["baseline", *variants.QUICK_SUBSET["attention_patterns"]]
    orders = [ablations.interleaved(names, L, seed) for L in (64, 128) for seed in (42, 43, 44)]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert len({o[0] for o in orders}) > 1  # the baseline is not always first
    assert ablations.interleaved(names, 64, 42) == ablations.interleaved(names, 64, 42)  # reproducible


def test_flop_and_parameter_formulas_match_counts_from_the_modules():
    """indexer_flops_per_token / attention_flops_per_token / indexer_param_count against the modules: the
    projection FLOPs and the score-product FLOPs counted by torch's FlopCounterMode (the formula's causal
    prefix is the full L x L product's (L+1)/(2L) share)."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    from dsa_lab.experiments import ablations
    from config import ModelConfig
    from models import SparseAttentionMoELLM, build_indexer
    from conftest import indexer_param_count
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=16, num_experts=2,
                      expert_top_k=1, indexer_heads=3, indexer_dim=8, indexer_rope_dim=4, sparse_top_k=4)
    L, H, d = 16, cfg.indexer_heads, cfg.indexer_dim
    indexer = build_indexer(cfg)
    assert sum(p.numel() for p in indexer.parameters()) == indexer_param_count(cfg.d_model, H, d)
    model = SparseAttentionMoELLM(cfg)
    assert sum(p.numel() for p in model.indexer_parameters()) == cfg.n_layers * indexer_param_count(cfg.d_model, H, d)
    x = torch.randn(1, L, cfg.d_model)
    with FlopCounterMode(display=False) as counter:
        indexer(x)
    counted = counter.get_total_flops() / L  # per token, one layer, full L x L scores
    proj = 2 * cfg.d_model * (H * d + d + H)
    full_scores = L * H * (2 * d + 2)  # q.k per (key, head), and the head weighting (a matmul over heads)
    assert counted == pytest.approx(proj + full_scores, rel=1e-9)
    formula = ablations.indexer_flops_per_token(cfg, L) / cfg.n_layers
    assert formula == pytest.approx(proj + (L + 1) / 2 * H * (2 * d + 2))
    shared = dataclasses.replace(cfg, shared_indexer_group=2)
    assert ablations.indexer_flops_per_token(shared, L) == pytest.approx(formula)  # one indexer for both layers
    # main attention: QKV + out projections (counted on the module) + QK^T and PV over mean_keys keys
    attn = model.attentions[0]
    with FlopCounterMode(display=False) as counter:
        attn.out_proj(attn.qkv(x)[..., : cfg.d_model])
    assert counter.get_total_flops() / L == pytest.approx(2 * cfg.d_model * 4 * cfg.d_model)
    q, k = torch.randn(1, cfg.n_heads, 1, 8), torch.randn(1, cfg.n_heads, 5, 8)  # one query over 5 selected keys
    with FlopCounterMode(display=False) as counter:
        (q @ k.transpose(-1, -2)).softmax(-1) @ torch.randn(1, cfg.n_heads, 5, 8)
    assert counter.get_total_flops() == 4 * cfg.d_model * 5  # QK^T + PV over d_model = heads x head dim
    assert ablations.attention_flops_per_token(cfg, 5.0) == cfg.n_layers * (8 * 32 * 32 + 4 * 32 * 5.0)


def test_bytes_moved_follow_the_bit_width():
    import dataclasses

    from dsa_lab.experiments import ablations
    from config import ModelConfig
    cfg = ModelConfig()
    b = {p: ablations.indexer_bytes_per_token(dataclasses.replace(cfg, indexer_precision=p), 256)
         for p in ("fp32", "fp16", "fp8", "int8", "int4")}
    assert b["fp32"] > b["fp16"] > b["int8"] > b["int4"] and b["fp8"] < b["int8"]  # fp8: 1-byte scales
    keys_fp32 = 4 * ((256 + 1) / 2 * cfg.indexer_dim + cfg.indexer_heads * cfg.indexer_dim) + 4 * cfg.indexer_heads
    assert b["fp32"] == pytest.approx(cfg.n_layers * keys_fp32)


def test_step_peak_memory_counts_the_step_not_the_process():
    from dsa_lab.experiments import ablations
    from conftest import tiny_model_config
    from models import SparseAttentionMoELLM
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(tiny_model_config(max_seq_len=32))
    small = ablations.step_peak_memory_mb(model, torch.randint(0, 64, (1, 32)), torch.randint(0, 64, (1, 32)),
                                          torch.device("cpu"))
    large = ablations.step_peak_memory_mb(model, torch.randint(0, 64, (8, 32)), torch.randint(0, 64, (8, 32)),
                                          torch.device("cpu"))
    assert 0 < small < 5 and small < large < 4 * 8 * small  # MBs of activations that grow with the batch
    # (the process RSS, hundreds of MB and never going down, would fail both)
    assert all(p.grad is None for p in model.parameters())


def test_multiscale_variant_that_covers_the_prefix_is_refused_before_training(tmp_path, corpus):
    from dsa_lab.experiments import ablations
    from config import build_configs
    model_cfg, train_cfg, data_cfg, exp_cfg = build_configs({**TINY, "seq_lens": [32], "seeds": [1], "device": "cpu",
                                                             "cache_dir": str(tmp_path / "cache")}, preset="quick")
    with pytest.raises(ValueError, match="multiscale_block=16 .*whole prefix"):
        ablations.run_variants({"ms": {"multiscale_block": 16}}, model_cfg, train_cfg, data_cfg, exp_cfg, tmp_path)
    assert not (tmp_path / "records").exists()


def test_variants_of_one_comparison_run_on_one_code_path():
    """A mix of plain and reference-path variants runs every variant on the masked backend (timings compare the
    optimisations, not a chunked path against a full-score path); an all-plain comparison keeps the fast backend."""
    import dataclasses

    from dsa_lab.experiments.ablations import one_code_path
    from config import ModelConfig
    base = ModelConfig(attention_backend="gather")
    mixed = one_code_path({"baseline": base, "fp8": dataclasses.replace(base, indexer_precision="fp8")})
    assert {c.attention_backend for c in mixed.values()} == {"masked"}
    plain = one_code_path({"baseline": base, "light": dataclasses.replace(base, indexer_heads=2, indexer_dim=32)})
    assert {c.attention_backend for c in plain.values()} == {"gather"}
