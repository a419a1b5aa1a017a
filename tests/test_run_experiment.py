"""The CLI end to end on the embedded corpus: result files and their shape, resume, refusals, errors."""
import json
import sys

import pytest

import run_experiment
import visualize_attention
from dsa_lab.common.results_io import run_fingerprint

TINY = dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, num_experts=4, expert_top_k=2, indexer_heads=2,
            indexer_dim=16, indexer_rope_dim=8, batch_size=4, eval_every=4, eval_windows=8, profile_steps=1,
            learning_rate=1e-2, warmup_lr=1e-2)
ARGS = ["--preset", "quick", "--seq-lens", "16", "32", "--steps", "4", "--warmup-steps", "3", "--dense-steps", "5",
        "--seeds", "1", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("results")
    cache = tmp_path_factory.mktemp("cache")
    run_experiment.CONFIG.update(TINY, cache_dir=str(cache))
    assert run_experiment.main(ARGS + ["--out", str(out)]) == 0
    yield out
    run_experiment.CONFIG.clear()


def _is_stat(x):
    return set(x) == {"mean", "ci95", "per_seed"} and len(x["ci95"]) == 2 and len(x["per_seed"]) == 2


def test_summary_json_has_the_documented_shape(results):
    s = json.loads((results / "summary.json").read_text())
    assert s["experiment"] == "sparse_vs_classic" and s["seeds"] == [1, 2] and s["sequence_lengths"] == [16, 32]
    assert {"model", "train", "data"} <= set(s["config"])
    for L in ("16", "32"):
        r = s["results"][L]
        for model in ("classic", "sparse"):
            for m in ("final_val_loss", "final_val_accuracy", "final_val_perplexity", "avg_time_per_step"):
                assert _is_stat(r[model][m]), (L, model, m)
                lo, hi = r[model][m]["ci95"]
                assert lo <= r[model][m]["mean"] <= hi
        for m in ("indexer_recall", "random_recall"):
            assert _is_stat(r["sparse"][m])
    assert s["results"]["32"]["top_k"] == 16
    for L in ("16", "32"):  # paired by seed against classic, in the one vocabulary
        sparse = s["results"][L]["sparse"]
        assert _is_stat(sparse["delta_val_loss_vs_classic"]) and _is_stat(sparse["time_ratio_vs_classic"])
        assert sparse["delta_val_loss_vs_classic"]["mean"] == pytest.approx(
            sparse["final_val_loss"]["mean"] - s["results"][L]["classic"]["final_val_loss"]["mean"])
    sig = s["significance"]  # sparse vs classic at every length: Holm-corrected paired t-tests
    assert sig["correction"] == "holm" and sig["n_tests"] == 2 and [t["L"] for t in sig["tests"]] == [16, 32]
    assert all(t["p_holm"] >= t["p"] for t in sig["tests"])
    assert s["config"]["run"]["device"] == "cpu" and s["config"]["run"]["dtype"] == "fp32"  # part of the key
    for env in (s["environment"], json.loads((results / "seq_16" / "runs" / "seed_2.json").read_text())["environment"]):
        assert env["world_size"] == 1 and env["device"] == "cpu" and env["command_line"] == sys.argv  # the process's
        assert {"python", "torch", "triton", "cuda", "device_name", "git_commit", "git_dirty"} <= set(env)
    record = json.loads((results / "seq_32" / "runs" / "seed_1.json").read_text())
    assert record["config"] == s["config"] and record["wall_time_s"] > 0 and s["wall_time_s"] > 0


def test_per_length_files_figure_and_report(results):
    for L in (16, 32):
        for model in ("classic", "sparse"):
            f = json.loads((results / f"seq_{L}" / f"{model}_results.json").read_text())
            run = f["runs"][0]
            keys = {"steps", "train_loss", "val_loss", "val_accuracy", "time_per_step"}
            keys |= {"indexer_kl", "indexer_recall"} if model == "sparse" else set()
            assert keys <= set(run) and run["steps"] == [4]
            assert (results / f"seq_{L}" / "checkpoints" / f"{model}_seed1.pt").exists()
    assert (results / "sequence_length_comparison.png").stat().st_size > 10_000
    report = (results / "REPORT.md").read_text()
    assert "| 32 | 16 |" in report and "recall" in report and "Holm-Bonferroni" in report
    assert "## Warm-up" in report and "| 32 | 2 | 3 | step_cap |" in report  # each seed's warm-up: steps, why it ended


def test_finished_runs_are_read_back_and_another_config_is_refused(results, capsys):
    before = (results / "seq_16" / "runs" / "seed_1.json").read_text()
    assert run_experiment.main(ARGS + ["--out", str(results)]) == 0
    assert "read back" in capsys.readouterr().out
    code = run_experiment.main(ARGS[:-5] + ["--top-k-ratio", "0.25", "--seeds", "1", "2", "--device", "cpu",
                                            "--out", str(results)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different config" in err and "\n" not in err
    assert (results / "seq_16" / "runs" / "seed_1.json").read_text() == before  # nothing lost
    code = run_experiment.main(ARGS + ["--experiment", "indexer_optimization", "--out", str(results)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds results of experiment 'sparse_vs_classic'" in err


def test_runs_from_another_machine_are_not_read_back(results, capsys, monkeypatch):
    """The sweep's fingerprint names the resolved device, its name (CPU: the processor model) and torch: a
    finished CPU run is never read back into another machine's summary (ms/step included)."""
    record = json.loads((results / "seq_16" / "runs" / "seed_1.json").read_text())
    from dsa_lab.experiments import skeleton as experiment
    assert record["config"]["run"] == run_fingerprint("cpu") and run_fingerprint("cpu")["device"] == "cpu"
    monkeypatch.setattr(experiment, "run_fingerprint", lambda device, dtype="fp32": {**run_fingerprint(device, dtype),
                                                                                    "device_name": "other"})
    code = run_experiment.main(ARGS + ["--out", str(results)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different config" in err


def test_a_half_written_run_record_is_named_with_the_fix_and_other_runs_are_kept(results, tmp_path, capsys):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(results, out)
    bad, good = out / "seq_16" / "runs" / "seed_1.json", out / "seq_16" / "runs" / "seed_2.json"
    original = json.loads(bad.read_text())["results"]
    bad.write_text(bad.read_text()[:200])  # a record cut short (e.g. written by an older version, disk full)
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p != bad}
    code = run_experiment.main(ARGS + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(bad) in err and "--overwrite" in err and "\n" not in err and "Traceback" not in err
    assert all(p.read_bytes() == data for p, data in kept.items())  # nothing was touched
    assert run_experiment.main(ARGS + ["--out", str(out), "--overwrite"]) == 0  # only that run is redone
    assert good.read_bytes() == kept[good] and (out / "seq_32" / "runs" / "seed_1.json").read_bytes() == \
        kept[out / "seq_32" / "runs" / "seed_1.json"]
    redone = json.loads(bad.read_text())["results"]
    assert redone["sparse"]["curves"]["val_loss"] == original["sparse"]["curves"]["val_loss"]


def test_a_record_from_an_older_version_is_named_with_the_fix(results, tmp_path, capsys):
    """Same config fingerprint but a metric the summary now reads is missing: one line naming the record and the
    folder to delete, exit 2, nothing touched (was a KeyError traceback)."""
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(results, out)
    old = out / "seq_32" / "runs" / "seed_2.json"
    record = json.loads(old.read_text())
    del record["results"]["sparse"]["final"]["tokens_per_s"]
    old.write_text(json.dumps(record))
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = run_experiment.main(ARGS + ["--out", str(out)])
    err = capsys.readouterr().err.strip()  # the sweep's progress bar, then the error line
    line = err.splitlines()[-1]
    assert code == 2 and str(old) in line and "tokens_per_s" in line and str(out / "seq_32") in line
    assert line.startswith("error:") and "Traceback" not in err
    assert all(p.read_bytes() == data for p, data in kept.items())


@pytest.mark.parametrize("argv, fragment", [
    (["--seq-lens", "1"], "seq_lens"),
    (["--preset", "huge"], "preset='huge'"),
    (["--dataset", "./missing.txt"], "does not exist"),
])
def test_user_errors_are_one_line_and_exit_2(argv, fragment, capsys, tmp_path):
    code = run_experiment.main(argv + ["--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "\n" not in err and "Traceback" not in err


def test_bad_flag_values_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_experiment.main(["--steps", "many"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "invalid int value" in err and "\n" not in err


def test_visualize_attention_from_a_checkpoint(results, tmp_path, capsys):
    png = tmp_path / "sel.png"
    ckpt = results / "seq_32" / "checkpoints" / "sparse_seed1.pt"
    assert visualize_attention.main(["--checkpoint", str(ckpt), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 5_000 and "mean sparsity" in out and "token coverage" in out
    classic = results / "seq_32" / "checkpoints" / "classic_seed1.pt"
    assert visualize_attention.main(["--checkpoint", str(classic), "--out", str(png)]) == 2


def test_overwrite_replaces_every_stale_seed(tmp_path, corpus):
    out = str(tmp_path / "o")
    argv = ["--preset", "quick", "--seq-lens", "16", "--steps", "2", "--warmup-steps", "1", "--dense-steps", "1",
            "--seeds", "1", "2", "--device", "cpu", "--out", out]
    run_experiment.CONFIG.update(TINY, cache_dir=str(tmp_path / "cache"))
    try:
        assert run_experiment.main(argv) == 0
        assert run_experiment.main(argv + ["--top-k-ratio", "0.25", "--overwrite"]) == 0
    finally:
        run_experiment.CONFIG.clear()
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["results"]["16"]["top_k"] == 4


def test_selection_stats_on_a_known_mask():
    import torch
    mask = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.float)  # k = 1 except last row
    s = visualize_attention.sparsity_stats([mask])
    assert s["token_coverage"] == 1.0
    assert s["mean_sparsity"] == pytest.approx(1 - 4 / 6)
    assert s["mean_selected_distance"] == pytest.approx((0 + 1 + 1 + 0) / 4)


def test_optimization_accepts_the_plans_category_names(capsys):
    """--optimization reduced_complexity quantization ... (the research plan's quick start) is accepted and listed
    in --help; an unknown name is one line, exit 2."""
    import run_experiment
    with pytest.raises(SystemExit):
        run_experiment.parse_args(["--help"])
    assert "reduced_complexity" in capsys.readouterr().out
    assert run_experiment.main(["--experiment", "indexer_optimization", "--optimization", "nonsense"]) == 2
    assert "unknown --optimization" in capsys.readouterr().err


@pytest.mark.parametrize("argv, applies_to", [
    (["--models", "dsa"], "long_context / adaptive_sparsity"),
    (["--task", "mqar"], "long_context"),
    (["--experiment", "long_context", "--optimization", "light"], "indexer_optimization"),
    (["--experiment", "long_context", "--top-k-ratio", "0.5"], "sparse_vs_classic / indexer_optimization"),
    (["--experiment", "adaptive_sparsity", "--top-k", "8"],
     "sparse_vs_classic / indexer_optimization / long_context / retrofit"),
    (["--experiment", "retrofit", "--readback-every", "5"],
     "sparse_vs_classic / indexer_optimization / long_context / adaptive_sparsity"),
])
def test_a_flag_the_experiment_does_not_read_is_refused_in_one_line(argv, applies_to, capsys):
    """Never silently ignored: one line naming the experiments the flag applies to, exit 2, before any work."""
    assert run_experiment.main(argv + ["--device", "cpu", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"applies to --experiment {applies_to}," in err and "\n" not in err


def test_every_experiment_specific_flag_is_declared():
    """Each flag in FLAG_EXPERIMENTS is a parser flag that is None unless given, naming only known experiments."""
    defaults = run_experiment.parse_args([])
    for flag, experiments in run_experiment.FLAG_EXPERIMENTS.items():
        assert set(experiments) <= set(run_experiment.EXPERIMENTS), flag
        assert hasattr(defaults, flag) and getattr(defaults, flag) is None, flag


def test_init_from_hf_refuses_execution_flags_it_does_not_apply(capsys):
    """--init-from-hf trains with the default execution: --readback-every (like --dtype bf16) is refused, not ignored."""
    assert run_experiment.main(["--init-from-hf", "/nonexistent", "--readback-every", "5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--readback-every are not supported with --init-from-hf" in err and "\n" not in err
