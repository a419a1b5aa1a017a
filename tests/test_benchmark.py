"""benchmark.py: a tiny run writes the JSON rows and the scaling plot; bad CLI input exits 2 with one line."""
import json
import subprocess
import sys

import pytest

import benchmark
from conftest import ROOT

TINY = ["--seq-lens", "128", "256", "--top-k", "16", "--heads", "2", "--head-dim", "16", "--indexer-heads", "2",
        "--indexer-dim", "16", "--block-size", "16", "--repeats", "1"]
ROW_KEYS = {"backend", "seq_len", "top_k", "fwd_ms", "fwd_bwd_ms", "peak_mem_mb", "indexer_ms", "speedup_vs_sdpa"}


def test_tiny_benchmark_writes_json_and_png(tmp_path, capsys):
    assert benchmark.main(TINY + ["--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert {"device", "torch", "rows"} <= set(data)
    assert (tmp_path / "benchmark_scaling.png").stat().st_size > 0
    rows = data["rows"]
    assert {(r["backend"], r["seq_len"]) for r in rows} >= {(b, L) for b in ("sdpa", "gather", "block")
                                                            for L in (128, 256)}
    for r in rows:
        assert ROW_KEYS <= set(r)
        if r["backend"] in ("sdpa", "gather", "block"):
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mem_mb"] >= 0
            assert r["speedup_vs_sdpa"] > 0
        else:  # triton / flex cannot run on CPU: a note, never a number
            assert r["fwd_ms"] is None and r["note"]
    assert all(r["indexer_ms"] > 0 for r in rows if r["backend"] in ("gather", "block"))
    assert {c["indexer"] for c in data["indexer_cost"]} == {"4x64", "2x32", "1x16", "1x8"}
    assert {q["backend"] for q in data["selection_quality"]} == {"gather", "block"}
    printed = capsys.readouterr().out
    assert "fwd+bwd ms" in printed and "indexer" in printed


def test_end_to_end_mode(tmp_path):
    assert benchmark.main(["--end-to-end", "--e2e-seq-len", "64", "--top-k", "16", "--block-size", "16",
                           "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "benchmark_end_to_end.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["classic", "sparse_gather", "sparse_block"]
    assert rows[0]["ratio_vs_classic"] == 1.0 and all(r["step_ms"] > 0 for r in rows)


@pytest.mark.parametrize("bad", [["--top-k", "0"], ["--seq-lens", "1"], ["--device", "tpu"],
                                 ["--heads", "x"], ["--dtype", "bfloat16"]])
def test_bad_cli_input_is_one_line_and_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_cli_exit_status_from_the_shell():
    result = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--top-k", "-3"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
