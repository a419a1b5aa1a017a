"""The long-context study end to end on tiny settings: both tasks, every model, resumable records, summary shape."""
import json
import math

import pytest
import torch

from dsa_lab.experiments import long_context
from sparse_attention import kept_pair_fraction
from conftest import record_stages
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)

TINY = dict(seq_lens=[32, 48], seeds=[1, 2], top_k=8, steps=4, warmup_steps=3, dense_steps=3, curriculum_steps=4,
            batch_size=2, eval_every=4, eval_windows=4, d_model=32, n_heads=2, n_layers=1, d_ff=32,
            indexer_heads=2, indexer_dim=8, indexer_rope_dim=4, profile_steps=1)


def test_kept_pair_fraction_matches_a_count():
    for L, k in ((10, 3), (64, 64), (100, 7), (5, 20)):
        kept = sum(min(k, t + 1) for t in range(L))
        assert kept_pair_fraction(L, k) == pytest.approx(kept / (L * (L + 1) / 2))


def test_long_context_runs_end_to_end_and_resumes(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(long_context, "load_corpus", lambda cfg: corpus)
    models = ["dense", "dsa", "local", "random", "oracle", "block"]
    summary = long_context.run_long_context("quick", ["lm", "mqar"], models, dict(TINY), tmp_path, False)
    for task in ("lm", "mqar"):
        for L in ("32", "48"):
            entry = summary["results"][task][L]
            assert entry["top_k"] == 8 and 0 < entry["kept_pair_fraction"] < 1
            for name in models:
                assert len(entry[name]["val_loss"]["per_seed"]) == 2
                assert entry[name]["delta_val_loss_vs_dense"]["ci95"][0] is not None
            assert entry["dense"]["delta_val_loss_vs_dense"]["mean"] == 0
            assert entry["dsa"]["warmup_recall_after"]["mean"] is not None
            assert len(entry["local"]["recall_by_distance"]) > 3
            for name in ("dsa", "local", "oracle"):  # recall beside its ceiling (the same evaluation): never above it
                shares = entry[name]["recall_share_of_oracle"]["per_seed"]
                assert all(0 < s <= 1 + 1e-6 for s in shares) and len(entry[name]["oracle_recall_by_distance"]) > 3
            assert entry["oracle"]["recall_share_of_oracle"]["mean"] == pytest.approx(1, abs=1e-5)
    assert "accuracy_by_distance" in summary["results"]["mqar"]["48"]["dsa"]
    for name in ("dsa", "local", "random", "oracle", "block"):  # per layer: the asked pair among the selected keys
        hits = summary["results"]["mqar"]["48"][name]["answer_hits"]
        assert len(hits) == TINY["n_layers"] and len(hits[0]["value"]["per_seed"]) == 2
        assert all(0 <= v <= 1 for v in hits[0]["key"]["per_seed"] + list(hits[0]["value_by_distance"].values()))
        assert all(hits[-1][k] is None or 0 <= hits[-1][k] <= 1 for k in ("answered_if_held", "answered_if_missed"))
    for seed in ("seed1", "seed2"):  # the split recombines to the model's accuracy (its correctness, not its errors)
        final = json.loads((tmp_path / "records" / "mqar" / "L48" / seed / "dsa.json").read_text())["final"]
        for hits in final["answer_hits"]:
            parts = [(hits["value"], hits["answered_if_held"]), (1 - hits["value"], hits["answered_if_missed"])]
            assert sum(w * a for w, a in parts if w > 0) == pytest.approx(final["accuracy"])
    assert "answer_hits" not in summary["results"]["mqar"]["48"]["dense"]
    assert "answer_hits" not in summary["results"]["lm"]["48"]["dsa"]
    for name in ("summary.json", "long_context.png", "mqar_accuracy_by_distance.png", "REPORT.md"):
        assert (tmp_path / name).exists()
    report = (tmp_path / "REPORT.md").read_text()
    assert "## Findings" in report and "| 48 |" in report
    for task, quality in (("lm", "val_loss"), ("mqar", "accuracy")):  # every model vs dense, dsa vs oracle, Holm
        sig = summary["significance"][task]
        assert sig["n_tests"] == 2 * (len(models) - 1) + 2 and {t["metric"] for t in sig["tests"]} == {quality}
        assert sorted(t["L"] for t in sig["tests"] if t["vs"] == "oracle") == [32, 48]
        assert all(t["p_holm"] >= t["p"] for t in sig["tests"])
        for entry in summary["results"][task].values():  # the indexer's own loss: dsa - oracle, paired by seed
            dsa, oracle = (entry[m][quality]["per_seed"] for m in ("dsa", "oracle"))
            assert entry["dsa"][f"delta_{quality}_vs_oracle"]["per_seed"] == pytest.approx(
                [d - o for d, o in zip(dsa, oracle)])
    assert "## Where DSA's gap comes from" in report and "| mqar | 48 | dsa | accuracy |" in report
    assert "Holm-Bonferroni" in report
    assert "| mqar | 48 | block | 2 | 3 | step_cap |" in report  # every indexer warm-up: steps used, why it ended
    assert "## MQAR: does the selection hold the pair" in report and "| 48 | oracle | 0 |" in report
    assert "## Recall as a share of its ceiling" in report and "| L | model | 0 | 1 | 3 | 7 | 15 | 31 |" in report
    # the same batches for every model: stage 2 of local and random saw identical inputs (same stream seed)
    record = json.loads((tmp_path / "records" / "lm" / "L32" / "seed1" / "dsa.json").read_text())
    assert record["config_fingerprint"] and record["model"] == "dsa"
    assert record["environment"]["world_size"] == 1 and record["config"]["seeds"] == [1, 2]
    assert record["wall_time_s"] > 0 and summary["environment"]["torch"] == torch.__version__
    # resume: finished records are read back, nothing retrains (training would fail with this patch)
    monkeypatch.setattr(long_context, "train_compared_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = long_context.run_long_context("quick", ["lm", "mqar"], models, dict(TINY), tmp_path, False)
    assert again["results"] == json.loads((tmp_path / "summary.json").read_text())["results"]
    with pytest.raises(ValueError, match="different config"):
        long_context.run_long_context("quick", ["lm"], models, {**TINY, "steps": 5}, tmp_path, False)
    # another machine (device name in the key) is a different config too: its runs are never read back here
    from dsa_lab.experiments import skeleton as experiment
    monkeypatch.setattr(experiment, "run_fingerprint", lambda device, dtype="fp32": {"device": "cpu",
                                                                                    "device_name": "other", "torch": "x"})
    with pytest.raises(ValueError, match="different config"):
        long_context.run_long_context("quick", ["lm"], models, dict(TINY), tmp_path, False)


def test_every_model_starts_from_the_branch_point_and_sees_the_same_batches(tmp_path, corpus, monkeypatch):
    """Recorded inside the real runner, per task: every compared model's stage 2 starts from the branch point's
    weights (dsa and block after a warm-up that moved only their indexers) and draws the same batches in the same
    order; dsa and block warm up on the same batches too."""
    monkeypatch.setattr(long_context, "load_corpus", lambda cfg: corpus)
    stages = record_stages(monkeypatch, long_context)
    tiny = {**TINY, "seq_lens": [32], "seeds": [1], "steps": 3, "warmup_steps": 2, "dense_steps": 2,
            "curriculum_steps": 2, "eval_every": 3, "eval_windows": 2}
    long_context.run_long_context("quick", ["lm", "mqar"], list(long_context.MODELS), {**tiny, "levers": ["head_max"]},
                                  tmp_path, False)
    for task in ("lm", "mqar"):
        branch = torch.load(tmp_path / "records" / task / "L32" / "seed1" / "branch.pt", weights_only=True)
        runs = {name: [r for r in stages if r["desc"] in (f"{task} L=32 seed=1 {name}" + end
                                                          for end in ("", " indexer warm-up"))]
                for name in long_context.MODELS}
        second = {name: r[-1] for name, r in runs.items()}  # stage 2: after the warm-up, if any
        assert {name: [r["stage"] for r in rs] for name, rs in runs.items()} == {
            "dense": ["dense"], "dsa": ["warmup", "sparse"], "local": ["sparse"], "random": ["sparse"],
            "oracle": ["sparse"], "block": ["warmup", "sparse"], "dsa_levers": ["warmup", "sparse"]}
        for name, record in second.items():
            start = record["start"]
            moved = [n for n in branch if not torch.equal(start[n], branch[n])]
            assert not moved, f"{task} {name} starts stage 2 away from the branch point: {moved}"
            assert len(record["batches"]) == tiny["steps"]
            assert all(torch.equal(a, b) for a, b in zip(record["batches"], second["dense"]["batches"])), \
                f"{task} {name} draws other batches than dense"
        dsa_warm, block_warm = runs["dsa"][0]["batches"], runs["block"][0]["batches"]
        assert len(dsa_warm) == tiny["warmup_steps"] and all(torch.equal(a, b) for a, b in zip(dsa_warm, block_warm))
        assert all(torch.equal(a, b) for a, b in zip(dsa_warm, runs["dsa_levers"][0]["batches"]))
    settings = long_context.task_settings("quick", "lm", dict(TINY))
    task = long_context.LMTask(corpus, 32, settings.train)  # another seed draws other batches
    assert not torch.equal(task.stream(1, 1).next()[0], task.stream(2, 1).next()[0])
    assert long_context.model_config(settings.model, "local").selection_source == "local"
    assert long_context.model_config(settings.model, "block").attention_backend == "block"


def test_mqar_curriculum_is_gated_shared_and_lengths_chain(tmp_path, monkeypatch):
    """The curriculum stops at the round whose held-out accuracy reaches the target, is trained once per seed,
    and each length's dense stage starts from the next shorter length's branch point."""
    settings = long_context.task_settings("quick", "mqar", {**TINY, "curriculum_steps": 6, "curriculum_round": 2,
                                                            "curriculum_target": 0.0, "batch_tokens": 64})
    assert long_context.task_train_config(settings.train, settings.options, 32).batch_size == 2
    starts = {}
    real = long_context.branch_point

    def spy(task, cfg, tcfg, seed, device, path, fingerprint_, start=None, run=long_context.Execution()):
        starts[cfg.max_seq_len] = start
        return real(task, cfg, tcfg, seed, device, path, fingerprint_, start, run)

    monkeypatch.setattr(long_context, "branch_point", spy)
    b48 = long_context.mqar_branch(48, 1, settings, torch.device("cpu"), tmp_path, "fp")
    rounds = json.loads((tmp_path / "curriculum" / "seed1" / "curriculum.json").read_text())["rounds"]
    assert [r["steps"] for r in rounds] == [2]  # target 0.0 is reached after the first round
    curriculum = torch.load(tmp_path / "curriculum" / "seed1" / "curriculum.pt", weights_only=True)
    b32 = torch.load(tmp_path / "L32" / "seed1" / "branch.pt", weights_only=True)
    assert all(torch.equal(starts[32][k], curriculum[k]) for k in curriculum)
    assert all(torch.equal(starts[48][k], b32[k]) for k in b32)
    assert not all(torch.equal(b48[k], b32[k]) for k in b32)  # 48 trained further
    assert json.loads((tmp_path / "L48" / "seed1" / "branch.json").read_text())["config_fingerprint"] == "fp"
    alone = long_context.task_settings("quick", "mqar", {**TINY, "seq_lens": [64]})  # 48 asked no more:
    alone.options["branch_ladder"] = [32, 48]  # as a preset of 32 / 48 / 64 gives it (long_context.branch_ladder)
    starts.clear()
    long_context.mqar_branch(64, 1, alone, torch.device("cpu"), tmp_path, "fp")
    assert all(torch.equal(starts[64][k], b48[k]) for k in b48)  # 64 climbs from the unevaluated 48


def test_mqar_asked_lengths_keep_the_presets_ladder():
    """--seq-lens 2048 alone on the cpu preset: the dense stage still climbs 256 / 512 / 1024 (without it the dense
    model did not learn MQAR at 2048); the full sweep's settings, and the lm task's, gain nothing."""
    ladder = lambda task, lens: long_context.task_settings("cpu", task, {"seq_lens": lens}).options.get(  # noqa: E731
        "branch_ladder")
    assert ladder("mqar", [2048]) == [256, 512, 1024] and ladder("mqar", [512, 2048]) == [256, 1024]
    assert ladder("mqar", [256, 512, 1024, 2048]) is None and ladder("mqar", [256]) is None
    assert ladder("lm", [2048]) is None


def test_a_truncated_branch_point_is_named_with_the_fix(tmp_path):
    path = tmp_path / "branch.pt"
    path.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ValueError, match="branch.pt is truncated or corrupt .*delete it") as info:
        long_context.branch_point(None, None, None, 1, "cpu", path, "fp")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_curriculum_below_target_restarts_from_a_fresh_initialisation(tmp_path, monkeypatch):
    monkeypatch.setattr(long_context, "CURRICULUM_RESTARTS", 1)
    settings = long_context.task_settings("quick", "mqar", {**TINY, "curriculum_steps": 2, "curriculum_round": 1,
                                                            "curriculum_target": 2.0})  # never reached
    cfg = settings.model.__class__(**{**settings.model.__dict__, "max_seq_len": 32})
    long_context.mqar_curriculum(cfg, settings.train, settings.options, 1, torch.device("cpu"), tmp_path, "fp")
    rounds = json.loads((tmp_path / "curriculum.json").read_text())["rounds"]
    assert [(r["attempt"], r["steps"]) for r in rounds] == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_findings_name_each_length_and_never_call_a_slower_model_faster():
    from dsa_lab.experiments import skeleton as experiment
    from dsa_lab.experiments import reports
    from dsa_lab.common.results_io import mean_ci95
    deltas = {"256": [0.1, 0.11, 0.12], "512": [-0.1, -0.11, -0.12], "1024": [-0.1, 0.2, 0.0]}
    ratios = {"256": [0.5, 0.6, 0.55], "512": [2.0, 2.1, 2.2], "1024": [0.9, 1.3, 1.1]}
    results = {"lm": {L: {"dense": {}, "dsa": {"delta_val_loss_vs_dense": mean_ci95(deltas[L]),
                                               "time_ratio_vs_dense": mean_ci95(ratios[L])}} for L in deltas}}
    sig = experiment.significance([{"L": int(L), "model": "dsa", "vs": "dense", "metric": "val_loss",
                                    "lower_is_better": True, "differences": d} for L, d in deltas.items()])
    head, quality, time = reports.long_context_findings({"results": results, "significance": {"lm": sig}},
                                                        ["dense", "dsa"])
    assert "3 paired t-test(s) against dense" in head and "Holm-Bonferroni" in head
    assert "behind dense at L = 256;" in quality and "ahead of dense at L = 512;" in quality
    assert "L=1024 0.033 ± " in quality and "p_Holm" in quality
    assert time.endswith("faster than dense (ratio's 95 % CI below 1) at L = 256.") and "L=512 2.10 ± " in time
