"""The experiment skeleton (dsa_lab/experiments/skeleton.py): paired differences' vocabulary, Holm-corrected significance, the cached
state and the resumable record, the run fingerprint, the stream offsets."""
import json

import pytest
import torch

from dsa_lab.experiments import skeleton as experiment
from dsa_lab.common.results_io import holm, paired_t_pvalue, paired_tests, run_fingerprint
from dsa_lab.training.train import Execution


def test_paired_differences_use_one_vocabulary_and_pair_by_position():
    finals = [{"val_loss": 2.0, "accuracy": 0.5, "avg_time_per_step": 3.0},
              {"val_loss": 1.0, "accuracy": 0.25, "avg_time_per_step": 1.0}]
    refs = [{"val_loss": 1.5, "accuracy": 0.75, "avg_time_per_step": 1.5},
            {"val_loss": 1.25, "accuracy": 0.5, "avg_time_per_step": 2.0}]
    stats = experiment.paired_differences(finals, refs, "dense", metrics=("val_loss", "accuracy"))
    assert set(stats) == {"delta_val_loss_vs_dense", "delta_accuracy_vs_dense", "time_ratio_vs_dense"}
    assert stats["delta_val_loss_vs_dense"]["per_seed"] == [0.5, -0.25]
    assert stats["delta_accuracy_vs_dense"]["per_seed"] == [-0.25, -0.25]
    assert stats["time_ratio_vs_dense"]["per_seed"] == [2.0, 0.5]  # comparison / reference, never the inverse
    missing = experiment.paired_differences([{"val_loss": None, "avg_time_per_step": 1.0}],
                                            [{"val_loss": 1.0, "avg_time_per_step": 0.0}], "x")
    assert missing["delta_val_loss_vs_x"]["mean"] is None and missing["time_ratio_vs_x"]["mean"] is None


def test_paired_tests_are_holm_corrected_across_the_family():
    diffs = {"a": [1.0, 1.1, 0.9, 1.05], "b": [0.1, -0.2, 0.3, 0.05], "c": [2.0]}
    tested = paired_tests(diffs)
    raw = {n: paired_t_pvalue(d) for n, d in diffs.items() if n != "c"}
    assert {n: tested[n]["p"] for n in raw} == raw
    assert {n: tested[n]["p_holm"] for n in raw} == holm(raw)  # m = 2: the untestable one is not counted
    assert tested["a"]["p_holm"] == pytest.approx(2 * raw["a"])  # the smaller p is doubled
    assert tested["c"] == {"p": None, "p_holm": None, "significant": None}
    assert tested["a"]["significant"] and not tested["b"]["significant"]


def test_significance_verdicts_follow_the_metrics_direction():
    worse_loss = [0.5, 0.52, 0.48, 0.51]
    sig = experiment.significance([
        {"L": 32, "metric": "val_loss", "lower_is_better": True, "differences": worse_loss},
        {"L": 32, "metric": "accuracy", "lower_is_better": False, "differences": worse_loss},  # higher acc: better
        {"L": 64, "metric": "val_loss", "lower_is_better": True, "differences": [0.3, -0.4, 0.1, -0.05]},
        {"L": 96, "metric": "val_loss", "lower_is_better": True, "differences": [0.3]}])
    verdicts = [t["verdict"] for t in sig["tests"]]
    assert verdicts == ["worse", "better", "n.s.", "untestable (1 seed)"]
    assert sig["n_tests"] == 3 and sig["correction"] == "holm"
    assert all(t["p_holm"] >= t["p"] for t in sig["tests"] if t["p"] is not None)
    assert sig["tests"][0]["L"] == 32 and sig["tests"][0]["delta"]["per_seed"] == worse_loss
    assert "differences" not in sig["tests"][0] and "lower_is_better" not in sig["tests"][0]


def test_cached_state_computes_once_and_records_its_fingerprint(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(3.0)}, {"seed": 7}
    path = tmp_path / "branch.pt"
    first = experiment.cached_state(path, "abc", compute, "cpu")
    again = experiment.cached_state(path, "abc", compute, "cpu")
    assert calls == [1] and torch.equal(first["w"], again["w"])
    assert json.loads(path.with_suffix(".json").read_text()) == {"config_fingerprint": "abc", "seed": 7}


def test_run_record_is_written_once_then_read_back(tmp_path):
    calls = []

    def compute(run):
        calls.append(run.folder)
        return {"final": {"val_loss": float("nan")}}
    args = (tmp_path / "r.json", "key1", {"seed": 3}, compute, Execution(), tmp_path / "resume", False, {"c": 1}, "cpu")
    record = experiment.run_record(*args)
    assert calls == [tmp_path / "resume"] and record["final"]["val_loss"] is None  # NaN -> null, as read back
    assert record["config_fingerprint"] == "key1" and record["seed"] == 3 and record["config"] == {"c": 1}
    assert record["environment"]["device"] == "cpu" and record["wall_time_s"] >= 0
    assert experiment.run_record(*args) == record and len(calls) == 1


def test_config_key_carries_the_run_fingerprint():
    config, key = experiment.config_key({"model": {"d": 1}}, "cpu", Execution())
    assert config["run"] == run_fingerprint("cpu", "fp32")
    assert set(config["run"]) == {"device", "device_name", "torch", "dtype"} and config["run"]["torch"] == torch.__version__
    bf16 = experiment.config_key({"model": {"d": 1}}, "cpu", Execution(dtype="bf16"))[1]
    assert bf16 != key  # a bf16 run is never read back as an fp32 one


def test_stale_records_are_refused_or_cleared(tmp_path):
    folder = tmp_path / "L32"
    record = folder / "dense.json"
    folder.mkdir()
    record.write_text(json.dumps({"config_fingerprint": "old"}))
    with pytest.raises(ValueError, match="different config"):
        experiment.clear_stale(tmp_path, {record: "new"}, overwrite=False)
    experiment.clear_stale(tmp_path, {record: "new"}, overwrite=True, folder_of=lambda r: r.parent)
    assert not folder.exists()


def test_stream_offsets_are_the_documented_ones():
    from dsa_lab.training.data import STREAM_CURRICULUM, STREAM_PRETRAIN, STREAM_TRAIN, STREAM_WARMUP, stream_seed
    assert (STREAM_TRAIN, STREAM_WARMUP, STREAM_PRETRAIN, STREAM_CURRICULUM) == (1, 2, 3, 4)
    assert stream_seed(42, STREAM_PRETRAIN) == 42_003  # the seeds every finished result was trained with
    assert len({stream_seed(s, p) for s in range(5) for p in (1, 2, 3, 4)}) == 20
