"""Run plumbing: fingerprints stay stable, saves are atomic, stale runs are refused, CLI errors are one line."""
import json
from pathlib import Path

import pytest
import torch

from dsa_lab.common.results_io import (OneLineArgumentParser, atomic_path, atomic_save_torch, atomic_write_json, atomic_write_text,
                        check_stale, fingerprint, mean_ci95, run_cli)


def test_fingerprint_is_stable_and_ignores_key_order():
    cfg = {"model": {"d_model": 32, "path": Path("/x")}, "seeds": [1, 2], "lr": 1e-3}
    assert fingerprint(cfg) == "a83273bc485a8c61"  # finished runs on disk carry this value: it must not drift
    assert fingerprint({"lr": 1e-3, "seeds": [1, 2], "model": {"path": "/x", "d_model": 32}}) == fingerprint(cfg)
    assert fingerprint({**cfg, "lr": 2e-3}) != fingerprint(cfg)


def test_atomic_json_is_standard_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_write_json(path, {"a": float("nan"), "b": [1.5, float("inf")], 3: (1, 2)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "3": [1, 2]}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text())["b"] == [1.5, None]
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text())["b"] == [1.5, None]
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temp file left behind


def test_atomic_text_and_torch_round_trip(tmp_path):
    atomic_write_text(tmp_path / "R.md", "# report\n")
    assert (tmp_path / "R.md").read_text() == "# report\n"
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    atomic_save_torch(state, tmp_path / "ckpt" / "s.pt")
    assert torch.equal(torch.load(tmp_path / "ckpt" / "s.pt")["w"], state["w"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["s.pt"]


def test_check_stale_refuses_other_configs_unless_overwrite(tmp_path):
    same, other, missing = tmp_path / "same.json", tmp_path / "other.json", tmp_path / "missing.json"
    atomic_write_json(same, {"config_fingerprint": "k1"})
    atomic_write_json(other, {"config_fingerprint": "old"})
    expected = {same: "k1", other: "k2", missing: "k3"}
    with pytest.raises(ValueError, match=r"holds 1 finished run\(s\) made with a different config") as info:
        check_stale(tmp_path, expected, overwrite=False)
    assert "other.json" in str(info.value) and "\n" not in str(info.value)
    assert check_stale(tmp_path, expected, overwrite=True) == [other]
    assert check_stale(tmp_path, {same: "k1", missing: "k3"}, overwrite=False) == []


def test_argument_errors_are_one_line_and_exit_2(capsys):
    p = OneLineArgumentParser()
    p.add_argument("--steps", type=int)
    with pytest.raises(SystemExit) as info:
        p.parse_args(["--steps", "many"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "invalid int value" in err and "\n" not in err


class Diverged(RuntimeError):
    pass


def _raise(exc):
    def job():
        raise exc
    return job


@pytest.mark.parametrize("exc, code", [(ValueError("bad key"), 2), (Diverged("nan loss"), 1),
                                       (KeyboardInterrupt(), 130)])
def test_run_cli_exit_codes(exc, code, capsys):
    assert run_cli(_raise(exc), failures=(Diverged,)) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_run_cli_success_and_bugs():
    assert run_cli(lambda: None) == 0
    with pytest.raises(Diverged):  # not declared a failure: a bug, with its traceback
        run_cli(_raise(Diverged("x")))
    with pytest.raises(KeyError):
        run_cli(_raise(KeyError("x")), failures=(Diverged,))


def test_mean_ci95():
    s = mean_ci95([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["ci95"] == pytest.approx([2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5])
    assert mean_ci95([1.0])["ci95"] == [None, None]


def test_paired_t_pvalue_and_holm_on_known_cases():
    from dsa_lab.common.results_io import holm, paired_t_pvalue
    assert paired_t_pvalue([1.0, 2.0, 3.0]) == pytest.approx(0.0742, abs=1e-4)  # t = 2 * sqrt(3), df = 2
    assert paired_t_pvalue([0.5, -0.5, 0.5, -0.5]) == pytest.approx(1.0)  # mean 0
    assert paired_t_pvalue([2.0, 2.2, 1.8, 2.1, 1.9]) == pytest.approx(9.30e-6, rel=0.01)  # t = 28.28, df = 4
    assert paired_t_pvalue([1.0]) is None
    # Holm: sorted p x (m - i), made monotone: 0.01*3, max(0.03*2, .03), max(0.04*1, .06)
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.5, "b": 0.9}) == {"a": 1.0, "b": 1.0}


def test_a_truncated_record_or_checkpoint_is_one_line_naming_the_path_and_the_fix(tmp_path):
    from dsa_lab.common.results_io import CorruptFile, load_torch, read_json
    record = tmp_path / "runs" / "seed_42.json"
    atomic_write_json(record, {"config_fingerprint": "k", "results": [1, 2, 3]})
    assert read_json(record)["config_fingerprint"] == "k"
    record.write_text(record.read_text()[:25])  # a half-written file (a crash before atomic writes existed)
    with pytest.raises(CorruptFile) as info:
        read_json(record)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and str(record) in msg and "--overwrite" in msg and "\n" not in msg
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CorruptFile, match="not an object"):
        read_json(tmp_path / "list.json")
    ckpt = tmp_path / "branch.pt"
    atomic_save_torch({"w": torch.ones(3)}, ckpt)
    assert torch.equal(load_torch(ckpt)["w"], torch.ones(3))
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CorruptFile) as info:
        load_torch(ckpt, fix="delete it (the branch point is retrained)")
    assert str(ckpt) in str(info.value) and "branch point is retrained" in str(info.value)
    assert "\n" not in str(info.value)


def test_check_stale_refuses_a_corrupt_record_and_overwrite_removes_only_it(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    atomic_write_json(good, {"config_fingerprint": "k"})
    bad.write_text('{"config_fingerprint" "k"')
    with pytest.raises(ValueError, match="bad.json is truncated or corrupt"):
        check_stale(tmp_path, {good: "k", bad: "k"}, overwrite=False)
    assert bad.exists() and good.exists()
    assert check_stale(tmp_path, {good: "k", bad: "k"}, overwrite=True) == []
    assert not bad.exists() and json.loads(good.read_text()) == {"config_fingerprint": "k"}


def test_run_environment_records_versions_git_state_and_command_line(monkeypatch):
    import subprocess
    import sys

    from dsa_lab.common.results_io import run_environment
    env = run_environment("cpu")
    assert env["torch"] == torch.__version__ and env["python"].count(".") == 2 and env["device"] == "cpu"
    assert env["world_size"] == 1 and env["command_line"] == sys.argv and env["device_name"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert env["git_commit"] == head and isinstance(env["git_dirty"], bool)
    json.dumps(env)  # plain JSON

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(subprocess, "run", no_git)
    env = run_environment()
    assert env["git_commit"] is None and env["git_dirty"] is None and env["device"] is None


def test_machine_key_names_the_resolved_device_its_model_and_torch():
    """CPU: the processor model (/proc/cpuinfo 'model name' on Linux), never 'auto' or a bare architecture."""
    from dsa_lab.common.results_io import machine_key
    key = machine_key(torch.device("cpu"))
    assert key["device"] == "cpu" and key["torch"] == torch.__version__
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name"))
        assert key["device_name"] == model
    assert key["device_name"] not in ("", "x86_64", "auto")
    with pytest.raises(RuntimeError):
        machine_key("auto")  # an unresolved device is not a device
